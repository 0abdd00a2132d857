"""Surgery: remove experts from in-memory models (`in_memory`) or straight from safetensors shards (`streaming`)."""
