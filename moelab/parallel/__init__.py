"""Scale-out on torch.distributed: the layout (``layout``), the runtime handle the trainer holds
(``runtime``), FSDP2 wrapping (``fsdp``), expert parallelism (``expert_parallel``), metered
collectives (``comm``), sharded checkpoints (``checkpoint``) and the ``--nproc`` launcher
(``launch``). With one process none of it touches torch.distributed."""

from moelab.parallel.layout import Layout, device_for, layout_from_env, plan_layout

__all__ = ["Layout", "device_for", "layout_from_env", "plan_layout"]
