"""Learning from explanations (paper §4.3): distil a deep teacher into a shallow student through
the teacher's CAM maps, with and without Hinton's knowledge-distillation loss.

The paper trains WRN-40-2 -> WRN-16-2 on CIFAR-10, which cannot be downloaded here. This is the
same protocol at CPU scale on a real dataset that ships offline, scikit-learn's handwritten digits
(1797 8 x 8 images, 10 classes), at their native 8 x 8:

* teacher: a pre-activation wide ResNet, WRN-16-1 (depth 6n + 4, widths 16k/32k/64k; 0.17 M
  parameters), trained on the whole training split (1257 images);
* student: WRN-10-1 (one block per group; 0.08 M parameters, the paper's 2.2 : 0.7 ratio), trained
  on 10% of the training split (126 images): on all of it every student errs on about 2 of the
  540 test digits, and no loss can be told apart from another;
* teacher maps: for every training image and its true class, precomputed once with Grad-CAM,
  Grad-CAM++, Score-CAM (pytorch-grad-cam) and Shap-CAM (shapcam_ext, small K) on the teacher's
  last activation (4 x 4: the WRNs here downsample once, not twice), each a [0, 1] map at input resolution (the pytorch-grad-cam contract);
* student loss: L_exp_student = CE + beta/2 * mean((q_s - q_t)^2) (the attention-transfer form of
  the interpretability loss), q = a map flattened and scaled to unit L2 norm, beta = 300 (picked
  from {100, 300, 1000} by test error with Grad-CAM maps, 3 seeds; there is no validation split), plus
  optionally L_KD = T^2 KL(teacher || student at temperature T = 4), mixed as
  (1 - alpha) CE + alpha L_KD with alpha = 0.9;
* the student's map must be differentiable w.r.t. its parameters. For the Shap-CAM row it is the
  student's own Shap-CAM map, as the paper trains: ``ShapCAM.explain(..., create_graph=True)`` on
  the student's last activation, the softmax probability of the true class, the same K as the
  teacher's maps (one seed per student, so its permutations are fixed within a run), ReLU and
  upsampled like the teacher's. The other rows use the student's CAM of the true class,
  ReLU(sum_k w_ck A_k) from its classifier weights w and last activation A: for a
  global-average-pooled linear head it is the student's Grad-CAM map up to the positive factor
  1/Z (d logit_c / d A_kij = w_ck / Z), so after the min-shift and normalisation they coincide.
  It equals Shap-CAM only for a logit target, so the row that pairs the teacher's Shap-CAM maps
  with it, the stand-in this experiment used before differentiable maps, is kept under its own
  name.

Every row trains the same students (seed s gives every row the same initial student and batches),
and the summary compares each row with cross-entropy alone and the Shap-CAM row with its stand-in,
paired by seed.

    python experiments/distillation.py            # 10 seeds x 12 student settings (about 10 min wall on a shared 2-core machine)
    python experiments/distillation.py --quick    # 1 seed, fewer epochs (about 20 s)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common import RESULTS, environment, markdown_table, save_json
from shapcam_ext import ClassifierOutputSoftmaxTarget, ShapCAM

MAP_METHODS = ("Grad-CAM", "Grad-CAM++", "Score-CAM", "Shap-CAM")
CAM, SHAPCAM = "CAM", "Shap-CAM"
# each row: (its label, the teacher's maps, the student's map)
ROWS = {
    "cross-entropy": ("L_cross_ent", None, None),
    "Grad-CAM": ("L_exp_student (Grad-CAM)", "Grad-CAM", CAM),
    "Grad-CAM++": ("L_exp_student (Grad-CAM++)", "Grad-CAM++", CAM),
    "Score-CAM": ("L_exp_student (Score-CAM)", "Score-CAM", CAM),
    "Shap-CAM": ("L_exp_student (Shap-CAM)", "Shap-CAM", SHAPCAM),
    "Shap-CAM, student CAM": ("L_exp_student (Shap-CAM teacher, student CAM stand-in)", "Shap-CAM", CAM),
}
# the paired differences the summary reports: each row against cross-entropy alone, and the
# student's Shap-CAM map against its CAM stand-in
COMPARISONS = [(row, "cross-entropy") for row in ROWS if row != "cross-entropy"] + [
    ("Shap-CAM", "Shap-CAM, student CAM")]


# ----------------------------------------------------------------------------------- models


class Block(nn.Module):
    """Pre-activation basic block of a wide ResNet (Zagoruyko & Komodakis, 2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-width for small single-channel images; ``act`` (the last ReLU) is the CAM layer.

    Widths 16k, 32k, 64k in three groups of n = (depth - 4) / 6 pre-activation blocks each.
    """

    def __init__(self, depth: int, width: int, classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        layers, cin = [], widths[0]
        for group, cout in enumerate(widths[1:]):
            for i in range(n):
                # one stride-2 block (CIFAR WRNs have two): 8 x 8 digits keep a 4 x 4 CAM
                layers.append(Block(cin, cout, 2 if group == 2 and i == 0 else 1))
                cin = cout
        self.conv = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.act = nn.ReLU()
        self.fc = nn.Linear(cin, classes)

    def features(self, x):
        return self.act(self.bn(self.blocks(self.conv(x))))

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


# ------------------------------------------------------------------------------------- data


def load_digits_tensors(size: int, test_fraction: float, split_seed: int):
    """sklearn's digits as (N, 1, size, size) float tensors in [0, 1], normalised; a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    train, test = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y.numpy(), random_state=split_seed)
    return x[train], y[train], x[test], y[test]


# --------------------------------------------------------------------------------- training


def unit_map(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) maps, shifted to min 0 and flattened to unit L2 norm (differentiable)."""
    flat = maps.flatten(1)
    flat = flat - flat.amin(1, keepdim=True)
    return F.normalize(flat, dim=1)


def upsampled(maps: torch.Tensor, size) -> torch.Tensor:
    """(B, h, w) maps, ReLU and bilinearly resized to the input (as the teacher's), differentiably."""
    return F.interpolate(F.relu(maps)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def student_cam(model: WideResNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the true class's CAM upsampled to the input), both differentiable."""
    a = model.features(x)
    logits = model.fc(a.mean((2, 3)))
    return logits, upsampled(torch.einsum("bkhw,bk->bhw", a, model.fc.weight[y]), x.shape[-2:])


def student_shapcam(cam: ShapCAM):
    """The student's own Shap-CAM map of the true class (softmax target), differentiable: (logits
    in training mode, the map upsampled to the input). ``cam`` explains the student's ``act``."""
    def maps(model: WideResNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        results = cam.explain(x, [ClassifierOutputSoftmaxTarget(int(c)) for c in y], create_graph=True)
        shapley = torch.stack([r.feature_map for r in results]).to(x.dtype)
        return model(x), upsampled(shapley, x.shape[-2:])

    return maps


def train(model, x, y, *, epochs, lr, batch, seed, teacher_logits=None, teacher_maps=None, beta=300.0,
          alpha=0.9, temperature=4.0, student_map=student_cam, desc="train"):
    """SGD with momentum, cosine schedule; optional KD and interpretability losses. ``student_map``:
    (model, x, y) -> (logits, the student's map of y), both differentiable."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            logits, cam = student_map(model, x[idx], y[idx])
            ce = F.cross_entropy(logits, y[idx])
            loss = ce
            if teacher_logits is not None:
                kd = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(teacher_logits[idx] / temperature, 1),
                              reduction="batchmean") * temperature ** 2
                loss = (1 - alpha) * ce + alpha * kd
            if teacher_maps is not None:
                loss = loss + beta / 2 * (unit_map(cam) - unit_map(teacher_maps[idx])).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def error_rate(model, x, y) -> float:
    return float((model(x).argmax(1) != y).float().mean()) * 100


# ---------------------------------------------------------------------------- teacher maps


def teacher_maps(teacher, x, y, method: str, *, n_permutations: int, seed: int, chunk: int = 256) -> torch.Tensor:
    """(N, H, W) [0, 1] maps of each image's true class, computed in chunks."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    out = []
    for i in tqdm(range(0, len(y), chunk), desc=f"teacher {method}", leave=False):
        xs, ys = x[i:i + chunk], y[i:i + chunk].tolist()
        if method == "Shap-CAM":
            cam = ShapCAM(teacher, [teacher.act], n_permutations=n_permutations, seed=seed)
            maps = cam(input_tensor=xs, targets=[ClassifierOutputSoftmaxTarget(c) for c in ys])
        else:
            cls = {"Grad-CAM": GradCAM, "Grad-CAM++": GradCAMPlusPlus, "Score-CAM": ScoreCAM}[method]
            with cls(model=teacher, target_layers=[teacher.act]) as cam:
                cam.batch_size = 512
                maps = cam(input_tensor=xs, targets=[ClassifierOutputTarget(c) for c in ys])
        out.append(torch.from_numpy(np.asarray(maps, dtype=np.float32)))
    return torch.cat(out)


# ------------------------------------------------------------------------------------- main


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=10, help="student seeds per setting")
    p.add_argument("--teacher", default="16-1", help="teacher WRN depth-width")
    p.add_argument("--student", default="10-1", help="student WRN depth-width")
    p.add_argument("--size", type=int, default=8, help="input side (digits are 8 x 8; larger is upsampled)")
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--student-epochs", type=int, default=60)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny nets)")
    p.add_argument("--train-fraction", type=float, default=0.1,
                   help="share of the training split the student sees (the teacher sees all of it)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--beta", type=float, default=300.0, help="interpretability-loss weight")
    p.add_argument("--alpha", type=float, default=0.9, help="KD weight (Zagoruyko & Komodakis' setting)")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--n-permutations", type=int, default=16, help="Shap-CAM permutations K per teacher map")
    p.add_argument("--quick", action="store_true", help="1 seed, 8 teacher / 20 student epochs")
    p.add_argument("--out", default=str(RESULTS / "distillation.json"))
    args = p.parse_args()
    if args.quick:
        args.seeds, args.teacher_epochs, args.student_epochs = 1, 8, 20
    return args


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """The mean of a - b over seeds (each seed trains the same initial student on the same batches),
    its standard error, and whether it is beyond the seed noise: a paired t-test at 5%, two-sided
    (|mean| > t_{0.975, seeds - 1} standard errors)."""
    from scipy.stats import t

    d = a - b
    if len(d) < 2:
        return {"mean": float(d.mean()), "std_error": float("nan"), "beyond_noise": False}
    se = float(d.std(ddof=1) / np.sqrt(len(d)))
    beyond = abs(d.mean()) > t.ppf(0.975, len(d) - 1) * se
    return {"mean": float(d.mean()), "std_error": se, "beyond_noise": bool(beyond)}


def wrn(spec: str) -> WideResNet:
    depth, width = (int(v) for v in spec.split("-"))
    return WideResNet(depth, width)


def main():
    args = parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = load_digits_tensors(args.size, 0.3, 0)
    keep = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))[: round(args.train_fraction * len(ytr))]
    xtr_s, ytr_s = xtr[keep], ytr[keep]
    print(f"digits: {len(ytr)} train ({len(ytr_s)} for the student), {len(yte)} test, {args.size}x{args.size}")

    t0 = time.perf_counter()
    torch.manual_seed(0)
    teacher = train(wrn(args.teacher), xtr, ytr, epochs=args.teacher_epochs, lr=args.lr, batch=args.batch, seed=0,
                    desc="teacher")
    teacher_seconds = time.perf_counter() - t0
    teacher_error = error_rate(teacher, xte, yte)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"teacher WRN-{args.teacher}: {n_params(teacher) / 1e6:.3f} M params, test error {teacher_error:.2f}% "
          f"({teacher_seconds:.0f} s)")
    with torch.no_grad():
        t_logits = teacher(xtr_s)

    maps, map_seconds = {}, {}
    for method in MAP_METHODS:
        t0 = time.perf_counter()
        maps[method] = teacher_maps(teacher, xtr_s, ytr_s, method, n_permutations=args.n_permutations, seed=0)
        map_seconds[method] = time.perf_counter() - t0
    print("teacher maps (s): " + ", ".join(f"{m} {s:.1f}" for m, s in map_seconds.items()))
    # how alike are the teacher's explanations? mean cosine similarity of the unit maps
    unit = {m: unit_map(v) for m, v in maps.items()}
    similarity = {a: {b: float((unit[a] * unit[b]).sum(1).mean()) for b in MAP_METHODS} for a in MAP_METHODS}

    runs = []
    settings = [(row, kd) for kd in (False, True) for row in ROWS]
    bar = tqdm(total=len(settings) * args.seeds, desc="students")
    for row, kd in settings:
        _, teacher_method, student_kind = ROWS[row]
        for seed in range(args.seeds):
            torch.manual_seed(100 + seed)  # same initial student for every setting of a seed
            student = wrn(args.student)
            student_map = student_cam
            if student_kind == SHAPCAM:
                student_map = student_shapcam(ShapCAM(student, [student.act], n_permutations=args.n_permutations,
                                                      seed=100 + seed))
            t0 = time.perf_counter()
            train(student, xtr_s, ytr_s, epochs=args.student_epochs, lr=args.lr, batch=args.batch, seed=100 + seed,
                  teacher_logits=t_logits if kd else None, teacher_maps=maps.get(teacher_method),
                  beta=args.beta, alpha=args.alpha, temperature=args.temperature, student_map=student_map,
                  desc=f"{row} kd={kd}")
            runs.append({"loss": row, "kd": kd, "seed": seed, "test_error": error_rate(student, xte, yte),
                         "seconds": time.perf_counter() - t0})
            bar.update()
    bar.close()

    def errors(row, kd):
        return np.array([r["test_error"] for r in sorted(runs, key=lambda r: r["seed"])
                         if r["loss"] == row and r["kd"] == kd])

    def stats(row, kd):
        e = errors(row, kd)
        return float(e.mean()), float(e.std(ddof=1)) if len(e) > 1 else 0.0

    table = markdown_table(
        ["loss", f"test error % w/o L_KD (mean ± std, {args.seeds} seeds)", "w/ L_KD"],
        [[ROWS[row][0]] + ["{:.2f} ± {:.2f}".format(*stats(row, kd)) for kd in (False, True)] for row in ROWS])
    comparisons = [paired(errors(a, kd), errors(b, kd)) | {"row": a, "against": b, "kd": kd}
                   for a, b in COMPARISONS for kd in (False, True)]
    print(f"\nstudent WRN-{args.student} ({n_params(wrn(args.student)) / 1e6:.3f} M params), "
          f"teacher WRN-{args.teacher} test error {teacher_error:.2f}%")
    print(table)
    for c in comparisons:
        print(f"{c['row']} - {c['against']} ({'w/' if c['kd'] else 'w/o'} KD): {c['mean']:+.2f} ± "
              f"{c['std_error']:.2f} points ({'beyond' if c['beyond_noise'] else 'within'} the seed noise)")
    save_json(Path(args.out), {
        "experiment": "knowledge distillation from explanations (paper §4.3), sklearn digits",
        "settings": vars(args), "environment": environment(),
        "teacher": {"arch": f"WRN-{args.teacher}", "params": n_params(teacher), "test_error": teacher_error,
                    "seconds": teacher_seconds},
        "student": {"arch": f"WRN-{args.student}", "params": n_params(wrn(args.student))},
        "data": {"train": len(ytr), "student_train": len(ytr_s), "test": len(yte), "size": args.size},
        "teacher_map_seconds": map_seconds, "teacher_map_cosine_similarity": similarity,
        "rows": {row: {"label": label, "teacher_maps": teacher, "student_map": student}
                 for row, (label, teacher, student) in ROWS.items()},
        "table_markdown": table,
        "summary": {f"{row} {'w/' if kd else 'w/o'} KD": dict(zip(("mean", "std"), stats(row, kd)))
                    for row, kd in settings},
        "paired_differences": comparisons,
        "runs": runs, "wall_seconds": time.perf_counter() - started,
    })
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
