"""Which process am I: one answer to "what is my global rank", for every way kdx can be launched.

Order of evidence (the first that applies wins):

1. an initialised ``torch.distributed`` process group (inside a running DDP job);
2. ``RANK``: torchrun, and kdx's own export for submitit's local executor (:mod:`kdx.sweep.launch`);
3. ``SLURM_PROCID`` when SLURM started several tasks (``SLURM_NTASKS`` > 1): each task of an ``srun`` /
   submitit SLURM job; Lightning's SLURM environment reads the same variable;
4. ``LOCAL_RANK`` and ``NODE_RANK`` (with ``LOCAL_WORLD_SIZE``, else ``WORLD_SIZE`` ÷ ``NUM_NODES``): the
   processes that Lightning's popen launcher starts (a node's launching process counts as local rank 0,
   so the first process of node 1 is never taken for rank 0);
5. otherwise 0: a single process, or the launching process before Lightning has started the others.

Without step 3, every task of a multi-node SLURM job would believe it is rank 0 (SLURM sets neither
``RANK`` nor ``LOCAL_RANK``): all of them would take the teacher store's lock to train a missing teacher
while task 0 waits for them inside DDP.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    value = env.get(key)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def rank(env: Optional[Mapping[str, str]] = None) -> int:
    """This process's global rank (0 when it is the only one)."""
    if env is None:
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            return int(td.get_rank())
        env = os.environ
    if (value := _int(env, "RANK")) is not None:
        return value
    if (_int(env, "SLURM_NTASKS") or 1) > 1 and (value := _int(env, "SLURM_PROCID")) is not None:
        return value
    local = _int(env, "LOCAL_RANK") or 0  # absent: the node's launching process (local rank 0)
    node = _int(env, "NODE_RANK") or _int(env, "GROUP_RANK") or 0
    if node == 0:
        return local
    per_node = _int(env, "LOCAL_WORLD_SIZE")
    if per_node is None:
        world, nodes = _int(env, "WORLD_SIZE"), _int(env, "NUM_NODES") or 1
        per_node = world // nodes if world else 1
    return node * per_node + local


def local_rank(env: Optional[Mapping[str, str]] = None) -> int:
    """This process's rank on its node (``LOCAL_RANK``, ``SLURM_LOCALID``; 0 when it is the only one)."""
    env = os.environ if env is None else env
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if (value := _int(env, key)) is not None and (key != "SLURM_LOCALID" or (_int(env, "SLURM_NTASKS") or 1) > 1):
            return value
    return 0


def is_rank_zero(env: Optional[Mapping[str, str]] = None) -> bool:
    return rank(env) == 0


__all__ = ["is_rank_zero", "local_rank", "rank"]
