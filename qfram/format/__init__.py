"""The bytes on the wire and on disk that are not pages: QEMU's savevm framing and its
readers, the VMDESCRIPTION JSON (vmdesc), and the working-set sidecar."""
