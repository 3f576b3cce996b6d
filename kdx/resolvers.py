"""The OmegaConf resolvers kdx's configs use (registered once, when the command line starts)."""
from __future__ import annotations

from omegaconf import OmegaConf

from kdx.paths import default_cache_dir, default_data_root, default_teachers_dir
from kdx.labels import method_label, model_name
from kdx.sweep.folders import fixed_keys, job_subdir, path_safe, run_dir, sweep_dir
from kdx.sweep.launch import launcher_gpus, launcher_tasks, linear_lr


def register_resolvers() -> None:
    plain = {
        "kdx_path_safe": path_safe,
        "kdx_data_dir": default_data_root,
        "kdx_teachers_dir": default_teachers_dir,
        "kdx_cache_dir": default_cache_dir,
        "kdx_method": method_label,
        "kdx_model_name": model_name,
        "kdx_job_subdir": job_subdir,
        "kdx_run_dir": run_dir,
        "kdx_launcher_tasks": launcher_tasks,
        "kdx_launcher_gpus": launcher_gpus,
        "kdx_linear_lr": linear_lr,
    }
    # cached: computed once where the sweep starts, then copied into each job's config by Hydra
    cached = {"kdx_sweep_dir": sweep_dir, "kdx_fixed_keys": fixed_keys}
    for name, fn in plain.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    for name, fn in cached.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


__all__ = ["register_resolvers"]
