"""Analysis tools: `python -m plca_jax.tools.associations` (cycle figures
and association statistics) and `python -m plca_jax.tools.class_overlap`
(which classes random source/target pairs share)."""
