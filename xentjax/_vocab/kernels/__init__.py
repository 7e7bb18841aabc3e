"""The quantities the engine computes, one kernel each (see `xentjax._vocab.kernel.Kernel`)."""
