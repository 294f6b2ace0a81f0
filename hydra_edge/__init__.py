"""hydra-edge: train, export and run the Hydra hybrid state-space language model on CPUs.

Glossary (names used throughout the package):

- ``d_model`` width of the residual stream; ``n_layer`` number of blocks.
- ``chunk`` tokens per routing, workspace-write and global-pooling period; a
  step call never crosses a chunk boundary.
- SSM: ``d_state`` state width N, ``headdim`` head width P, ``nheads`` H,
  ``d_conv`` causal convolution width; ``conv_state`` and ``ssm_state`` are its
  recurrent state.
- SGA: ``window`` positions kept in ``k_cache`` / ``v_cache``, ``n_global``
  pooled chunk summaries in ``k_global`` / ``v_global``.
- MoE: ``n_experts`` SwiGLU experts of width ``d_expert``, ``top_k`` used per chunk.
- Workspace: ``ws_slots`` slots of width ``d_model``.
- PKM: ``pkm_subkeys`` sub-keys per half, ``pkm_subkeys**2`` value rows, ``pkm_topk`` rows read.

Shape letters in comments: B batch, T time, D d_model, H heads, P headdim, N d_state.
"""

__version__ = "0.1.0"
