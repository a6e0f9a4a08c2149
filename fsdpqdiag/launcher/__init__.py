"""The one place that starts processes: launches, rank start (zygote fork or spawn), batches, signals."""
