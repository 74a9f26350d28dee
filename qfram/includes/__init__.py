"""C declarations shared by qfram's Cython modules (``.pxd`` files only; nothing here runs)."""
