"""Units shared by every layer: memory is counted in exact bytes and shown in MiB."""

MiB = 2**20  # bytes in the MiB of ``max_kv_mb`` and of every report
