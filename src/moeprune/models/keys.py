"""Config keys that different families use for the same fact (aliases, in the order they are tried)."""

COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")  # routed experts E
# experts per token k
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "top_k_experts")
