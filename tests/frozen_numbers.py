"""Every strategy's full ``loss_terms`` on fixed seeded inputs: the numbers a refactor must not change.

``python tests/frozen_numbers.py --write`` regenerates ``tests/data/frozen_loss_terms.json`` (only when a
change of the numbers is intended and explained in the commit); ``test_frozen_numbers.py`` compares.

Strategies are built from the real Hydra config (``distill=<method>``, the config's own defaults), so a
changed default shows up here too. Inputs: seeded logits (and feature maps for the feature methods),
labels, indices; modules with parameters (AFD, RTK) are built after seeding.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "data" / "frozen_loss_terms.json"
B, C = 8, 10

# method -> extra overrides (the label is the case name)
LOGIT_CASES = {
    "none": [],
    "kd": [],
    "kd_crd": [],
    "dkd": [],
    "topkd": [],
    "kd+topk_scale": ["distill/teacher_transform=topk_scale"],
    "dkd+topk_scale": ["distill/teacher_transform=topk_scale"],
    "reffakd": [],
}
FEATURE_CASES = {"afd": [], "rtk": [], "rtk_afd_roles": ["distill.roles=afd", "distill.top_k=all"]}
EPOCHS = (1, 5, 40)  # DKD's warm-up and anything epoch-dependent


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(B, C, generator=g) * 3
    z_t = torch.randn(B, C, generator=g) * 4
    y = torch.randint(0, C, (B,), generator=g)
    idx = torch.arange(B)
    x = torch.zeros(B, 3, 32, 32)
    return z_s, z_t, y, idx, x


def _features(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, 8, 8, 8, generator=g), torch.randn(B, 16, 4, 4, generator=g), torch.randn(B, 16, 4, 4, generator=g)]
    s = [torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 8, 4, 4, generator=g)]
    return t, s


def _round(v: torch.Tensor) -> float:
    return float(v.detach().to(torch.float64))


def compute(strategy_for) -> dict:
    """``strategy_for(case, overrides)`` returns the strategy object built from the config."""
    from kdx.distill.base import Batch, ModelOutput

    out: dict = {}
    z_s, z_t, y, idx, x = _inputs()
    batch = Batch(x, y, idx)
    for case, extra in LOGIT_CASES.items():
        method = case.split("+")[0]
        strat = strategy_for(method, extra)
        teacher_logits = z_t
        if method == "reffakd":  # a table teacher's logits: T·log Q[y] (a fixed soft-label table)
            q = torch.softmax(torch.randn(C, C, generator=torch.Generator().manual_seed(2)), dim=1)
            teacher_logits = strat.temperature * torch.log(q)[y]
        for epoch in EPOCHS:
            t_out = ModelOutput(strat.transform_teacher(teacher_logits, y)) if method != "none" else None
            terms = strat(ModelOutput(z_s.clone()), t_out, batch, epoch)
            out[f"{case}@{epoch}"] = {k: _round(v) for k, v in terms.items()}
    t_feats, s_feats = _features()
    for case, extra in FEATURE_CASES.items():
        method = case.split("_")[0]
        torch.manual_seed(3)
        strat = strategy_for(method, extra)
        strat.build_feature_modules({"blocks": [f.shape for f in t_feats]}, {"blocks": [f.shape for f in s_feats]})
        strat.train()
        terms = strat(ModelOutput(z_s.clone(), {"blocks": s_feats}), ModelOutput(z_t.clone(), {"blocks": t_feats}), batch, 1)
        out[f"{case}@1"] = {k: _round(v) for k, v in terms.items()}
    out.update(nayer_numbers(strategy_for))
    return out


def nayer_numbers(strategy_for) -> dict:
    """NAYER: the student's loss terms, and one synthesis step's generator terms on a seeded tiny teacher."""
    from kdx.datafree.augment import augment
    from kdx.datafree.losses import adversarial_loss, onehot_ce
    from kdx.datafree.nayer import BNStatHooks, NLGenerator, synthesis_targets
    from kdx.distill.base import Batch, ModelOutput
    from kdx.models import create_model

    out: dict = {}
    strat = strategy_for("nayer", [])
    z_s, z_t, y, idx, x = _inputs()
    terms = strat(ModelOutput(z_s), ModelOutput(strat.transform_teacher(z_t, y)), Batch(x, y, idx), 1)
    out["nayer/student@1"] = {k: _round(v) for k, v in terms.items()}

    torch.manual_seed(4)
    teacher = create_model("resnet8", num_classes=C).eval()
    student = create_model("resnet8", num_classes=C).eval()
    emb = torch.randn(C, 16, generator=torch.Generator().manual_seed(5))
    gen = NLGenerator(emb, ngf=8, img_size=32, nc=3, nl=C, le_emb_size=12, sbz=24)
    rng = torch.Generator().manual_seed(6)
    hooks = BNStatHooks(teacher, 0.9)
    gen.reinit_noisy(rng)
    targets = synthesis_targets(C, 24, rng)
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    for step in range(2):  # the second step mixes in the momentum statistics of the first
        xg = gen(targets)
        xa = augment(xg, mean, std, 4, True, rng)
        hooks.active = True
        t = teacher(xa)
        hooks.active = False
        s = student(xa)
        out[f"nayer/generator@step{step}"] = {
            "bn": _round(hooks.loss()),
            "oh": _round(onehot_ce(t, torch.nn.functional.one_hot(targets, C).float())),
            "adv": _round(adversarial_loss(s, t)),
            "image_sum": _round(xg.sum()),
        }
        hooks.update_momentum()
    return out


def compare(got: dict, want: dict, rtol: float = 1e-6, atol: float = 1e-7) -> list[str]:
    bad = []
    for case in sorted(set(got) | set(want)):
        a, b = got.get(case), want.get(case)
        if a is None or b is None:
            bad.append(f"{case}: {'missing now' if a is None else 'new (not in the fixture)'}")
            continue
        if set(a) != set(b):
            bad.append(f"{case}: terms {sorted(a)} != fixture {sorted(b)}")
            continue
        for k in a:
            if abs(a[k] - b[k]) > atol + rtol * abs(b[k]):
                bad.append(f"{case}.{k}: {a[k]!r} != fixture {b[k]!r}")
    return bad


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from test_frozen_numbers import strategy_for  # noqa: E402

    numbers = compute(strategy_for)
    if "--write" in sys.argv:
        FIXTURE.write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")
        print(f"wrote {FIXTURE} ({len(numbers)} cases)")
    else:
        print(json.dumps(numbers, indent=1, sort_keys=True))
