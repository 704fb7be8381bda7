"""The LTX-Video 0.9 family (through the ltx-video package, in its own interpreter)."""
