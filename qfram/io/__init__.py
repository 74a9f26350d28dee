"""Where bytes go and come from: channels a QEMUFile reads and writes, output files that
appear whole or not at all, pages released only once durable, restore targets."""
