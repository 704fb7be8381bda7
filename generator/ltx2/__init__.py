"""The LTX-2 family (LTX-2.0 / 2.3 through ltx-core): pipeline, model builders, tiny checkpoints."""
