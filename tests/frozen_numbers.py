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

# method -> extra overrides: the whole step (kdx.regimes.step.distill_step) on two seeded zoo networks, the
# teacher resnet8x4 and the student resnet8 (different widths: connectors, regressors, embeddings are built from
# the tapped shapes as at start-up), on a seeded batch with a second view (MLKD's strong view)
NETWORK_CASES = {
    "at": [], "sp": [], "pkt": [], "rkd": [], "nst": [], "kdsvd": [], "fitnet": [], "vid": [],
    "crd": ["distill.k=16"], "reviewkd": [], "ofd": [],
    "dist": [], "nkd": [], "ttm": [], "wttm": [], "sdd_kd": [], "sdd_dkd": [], "sdd_nkd": [],
    "ctkd": [], "ctkd_dkd": [], "mlkd": [], "mlkd_weak": [],
    "kd+ls": ["distill/logit_transform=ls"], "dkd+ls": ["distill/logit_transform=ls"],
}
NETWORK_EPOCHS = (1, 40)  # before and after every warm-up (ReviewKD, SDD) and CTKD's curriculum


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
    out.update(network_numbers(strategy_for))
    out.update(nayer_numbers(strategy_for))
    return out


def network_numbers(strategy_for) -> dict:
    """Each :data:`NETWORK_CASES` strategy's terms from the real step, as :func:`kdx.build.build` assembles it."""
    from kdx.distill.base import Batch, DataInfo
    from kdx.features import attach_feature_taps
    from kdx.models import create_model
    from kdx.regimes.step import StepParts, distill_step
    from kdx.teachers.base import Teacher

    class Frozen(Teacher):
        def __init__(self, net):
            super().__init__()
            self.net = net.eval().requires_grad_(False)

        def train(self, mode=True):
            return super().train(False)

        @property
        def network(self):
            return self.net

        @torch.no_grad()
        def forward(self, x, y=None, idx=None):
            from kdx.distill.base import ModelOutput

            return ModelOutput(self.net(x))

    out: dict = {}
    g = torch.Generator().manual_seed(7)
    x, strong = torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)
    y, idx = torch.randint(0, C, (B,), generator=g), torch.arange(B)
    labels = torch.arange(64) % C
    for case, extra in NETWORK_CASES.items():
        method = case.split("+")[0]
        strat = strategy_for(method, extra)
        torch.manual_seed(8)
        teacher = Frozen(create_model("resnet8x4", num_classes=C))
        student = create_model("resnet8", num_classes=C)
        strat.attach_data(DataInfo(C, labels, 0))
        strat.attach_networks(student, teacher.network)
        s_taps = t_taps = None
        if strat.needs_features:
            s_taps, t_taps = attach_feature_taps(strat, student, teacher, (3, 32, 32))
        heads = (student.get_classifier(), teacher.network.get_classifier()) if strat.needs_head else (None, None)
        parts = StepParts(student, strat, teacher, s_taps, t_taps, *heads)
        strat.train()
        batch = Batch(x, y, idx, {v: strong for v in strat.views})
        for epoch in NETWORK_EPOCHS:
            _, terms = distill_step(parts, batch, epoch)
            out[f"{case}/net@{epoch}"] = {k: _round(v) for k, v in terms.items()}
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
