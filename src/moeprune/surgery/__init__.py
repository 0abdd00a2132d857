"""Surgery: the edits that make a model smaller. Expert removal on an in-memory model (`in_memory`) or straight on
safetensors shards (`streaming`), expert merging (`merge`), neuron removal (`neurons`; per-layer widths:
`neurons_padded`). The stages in `stages/` call these."""
