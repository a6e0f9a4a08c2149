"""What runs inside a rank process: its entry, its runtime and the stack it captures."""
