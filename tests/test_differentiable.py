"""Differentiable maps (create_graph=True): every path's map is a differentiable function of the
input, the model's parameters and the baseline at fixed permutations (gradcheck in float64), the
graph keeps what the memory planner counts, the real Lite0's map gradient matches autograd through
the reference formulation, and a compiled training step gets the eager gradients."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import numerics
from shapcam_ext import ShapCAM, reference
from shapcam_ext.cli.images import bundled_photos, load_image
from shapcam_ext.cli.models import load_model
from shapcam_ext.cli.preprocessing import preprocess
from shapcam_ext.engine import NO_GRAPH
from shapcam_ext.head import split_model
from shapcam_ext.memory import MemoryPlanner, graph_bytes_per_permutation
from shapcam_ext.paths import incremental
from shapcam_ext.sampling import PermutationStream
from shapcam_ext.targets import ClassifierOutputSoftmaxTarget
from test_incremental import force

TARGETS = [ClassifierOutputSoftmaxTarget(1), ClassifierOutputSoftmaxTarget(2)]
SETTINGS = dict(n_permutations=8, seed=1)
# After a 1 -> 4 channel 3 x 3 conv and a tanh (the trunk), on 2 x 4 maps: 8 players. Batch norm
# and dropout sit where each path computes in its chunks (what the backward recomputes).
HEADS = {
    "pooled-linear": lambda: [nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)],
    "pooled": lambda: [nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5), nn.Tanh(),
                       nn.Dropout(0.5), nn.Linear(5, 3)],
    "local-pool": lambda: [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)],  # two 2 x 2 cells
    "local": lambda: [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 5)],
}
# (head, the path it must take, the incremental walk forced, settings)
CASES = [
    ("pooled-linear", "pooled-linear", None, {}),
    ("pooled", "pooled", None, {}),
    ("local-pool", "local-pool-linear", None, {}),
    ("local", "incremental-table", incremental.TABLE, {}),
    ("local", "incremental-recompute", incremental.RECOMPUTE, {}),
    ("local", "generic", None, {"fast_path": False}),
]
IDS = [path for _, path, _, _ in CASES]
# The second derivative exists where every op on the way has one: not through embedding_bag (the
# table's steps), nor through the compiled walk's backward (branch ops), which the pooled-linear
# path will use.
SECOND_ORDER = {"pooled", "local-pool-linear", "incremental-recompute", "generic"}


def tiny(head: str) -> nn.Sequential:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), *HEADS[head]()).double().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # running statistics far from any batch's
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model


@pytest.fixture(params=CASES, ids=IDS)
def case(request, monkeypatch):
    """(model, its ShapCAM, the path it takes) for each path."""
    head, path, walk, settings = request.param
    if walk is not None:
        force(monkeypatch, walk)
    model = tiny(head)
    return model, ShapCAM(model, [model[1]], **SETTINGS, **settings), path


def maps(cam: ShapCAM, x: torch.Tensor, **kwargs) -> torch.Tensor:
    return torch.stack([r.shapley for r in cam.explain(x, TARGETS, **kwargs)])


class Explained(nn.Module):
    """The maps as a module's output, so that torch.func.functional_call can swap its parameters."""

    def __init__(self, model: nn.Module, cam: ShapCAM):
        super().__init__()
        self.model, self.cam = model, cam

    def forward(self, x):
        return maps(self.cam, x, create_graph=True)


def inputs() -> torch.Tensor:
    torch.manual_seed(12)
    return torch.randn(2, 1, 2, 4, dtype=torch.float64)


# fast_mode: gradcheck compares a random projection of the Jacobian, as each evaluation is a whole
# Shap-CAM run.
def test_maps_are_differentiable_in_the_input_and_the_parameters(case):
    model, cam, path = case
    x = inputs().requires_grad_()
    name = f"{len(model) - 1}.weight"  # the head's last Linear
    weight = model.get_parameter(name).detach().clone().requires_grad_()

    def f(x, weight):
        return torch.func.functional_call(Explained(model, cam), {f"model.{name}": weight}, (x,))

    result = cam.explain(x, TARGETS, create_graph=True)
    assert {r.path for r in result} == {path}
    assert all(r.shapley.grad_fn is not None and r.feature_map.grad_fn is not None for r in result)
    assert torch.autograd.gradcheck(f, (x, weight), fast_mode=True)
    if path in SECOND_ORDER:
        # In the input only: the backward recomputes chunks with the model's own parameters, which
        # functional_call has put back by then (equal values: right first derivatives, not second).
        assert torch.autograd.gradgradcheck(lambda x: maps(cam, x, create_graph=True), (x,), fast_mode=True)


def test_maps_are_differentiable_in_the_baseline(case):
    model, cam, path = case
    x = inputs()

    def f(baseline):
        return maps(ShapCAM(model, [model[1]], config=cam.config, baseline=baseline), x, create_graph=True)

    assert torch.autograd.gradcheck(f, (torch.rand(4, 1, 1, dtype=torch.float64, requires_grad=True),),
                                    fast_mode=True)


def test_the_differentiable_map_is_the_map(case):
    model, cam, path = case
    x = inputs()
    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        plain = maps(cam, x)
        graph = maps(cam, x, create_graph=True)
    # Both estimate the same values from the same permutations (the differentiable walk is the
    # reference walk, the running sums a cumsum), each within map_error of them.
    value_error = numerics.model_value_error(scale, model, model[1], 8)
    numerics.assert_within(graph.detach(), plain, 2 * numerics.map_error(value_error), f"{path}: graph vs plain")


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``run()`` records,
    outside recomputed chunks (whose saved values are recomputed, not kept). The tensors are held,
    so that no storage is freed and its address reused while counting."""
    held = []

    def pack(tensor):
        held.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    del out
    return sum(sizes.values())


def test_the_graph_keeps_what_the_planner_counts(case):
    """The graph grows with the permutations by the worths and orders only: never the head's
    values on the masked maps, nor a walk's running sums."""
    model, cam, path = case
    x = inputs()

    def run(k):
        return lambda: maps(ShapCAM(model, [model[1]], config=cam.config, n_permutations=k), x, create_graph=True)

    more = saved_bytes(run(32)) - saved_bytes(run(16))
    assert more <= 16 * graph_bytes_per_permutation(2, 8), f"{path}: {more} bytes for 16 more permutations"


def test_the_planner_counts_the_graph_and_the_backward():
    plain, graph = MemoryPlanner(1000), MemoryPlanner(1000, graph_bytes=400)
    assert plain.units(100, fixed=200) == 8
    assert graph.units(100, fixed=200) == 2  # (1000 - 200 - 400) // (2 * 100)
    with pytest.raises(ValueError, match="the map's graph keeps.*raise memory_budget.*or lower n_permutations"):
        graph.units(250, fixed=200)


def test_a_batch_prepared_without_its_graph_is_refused():
    model = tiny("pooled")
    cam = ShapCAM(model, [model[1]], **SETTINGS)
    with pytest.raises(ValueError, match=re.escape(NO_GRAPH)):
        cam.estimate(cam.prepare(inputs()), TARGETS, create_graph=True)


def test_the_backward_recomputes_in_eval_mode(case):
    """A model in training mode gets its evaluation-mode map and that map's gradient: the backward
    recomputes its chunks in eval mode too, after explain has restored the model's modes."""
    model, cam, path = case
    x = inputs().requires_grad_()
    evaluated = copy.deepcopy(model)
    model.train()
    buffers = copy.deepcopy(list(model.buffers()))
    (got,) = torch.autograd.grad(maps(cam, x, create_graph=True).sum(), x)
    (expected,) = torch.autograd.grad(maps(ShapCAM(evaluated, [evaluated[1]], config=cam.config), x,
                                           create_graph=True).sum(), x)
    assert torch.equal(got, expected), f"{path}: the gradient depends on the model's mode"
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    assert model.training


def test_the_model_is_left_as_it_was():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Dropout(0.5),
                          *HEADS["pooled"]()).double().train()
    model[5].eval()
    model[0].bias.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    result = ShapCAM(model, [model[2]], **SETTINGS).explain(inputs(), TARGETS, create_graph=True)
    torch.stack([r.shapley for r in result]).sum().backward()
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model[0].bias.grad is None and model[0].weight.grad is not None  # only through the user's backward


# ---- the real EfficientNet-Lite0 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0_cat():
    """The real weights and the cat, in float64: there, the rounding bounds are far below the
    gradients (in float32 the logits' worst-case error alone, about 1e-2 here, moves the softmax's
    derivatives by as much as the gradient's cancellations leave)."""
    model, cfg = load_model()
    return model.double(), preprocess(load_image(bundled_photos()["chelsea"]), cfg).double()


def test_the_map_gradient_matches_autograd_through_the_reference_on_lite0(lite0_cat, monkeypatch):
    model, x = lite0_cat
    drawn = []
    take = PermutationStream.take
    monkeypatch.setattr(PermutationStream, "take", lambda self, count: drawn.append(take(self, count)) or drawn[-1])
    cam = ShapCAM(model, ["bn2"], n_permutations=16, seed=0)
    prepared = cam.prepare(x, create_graph=True)
    activation = prepared.layers[0].activation
    category = int(prepared.outputs.argmax())
    result = cam.estimate(prepared, [ClassifierOutputSoftmaxTarget(category)], create_graph=True)[0]
    assert result.path == "pooled-linear"
    cotangent = torch.randn(1, 49, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (got,) = torch.autograd.grad((result.shapley.flatten() * cotangent[0]).sum(), activation)

    # The reference, in float64: masked maps -> head -> worths -> marginals, by autograd.
    perms = torch.cat(drawn)
    k, n = perms.shape
    ranks = reference.permutation_ranks(perms)
    head = split_model(model, "bn2").head
    act = activation.detach().requires_grad_()
    values = torch.stack([
        head(reference.masked_prefixes(act, act.new_zeros(()), ranks, i, i + 1, 0, n + 1)).softmax(-1)[:, category]
        for i in range(k)])[None]  # (1, K, n+1)
    phi, phi_sq = torch.zeros(1, n, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)
    reference.scatter_marginals_(values, ranks, phi, phi_sq)
    (expected,) = torch.autograd.grad((phi / k * cotangent).sum(), act)

    classifier, classes = model.classifier, torch.tensor([category])
    bound = 2 * numerics.pooled_softmax_map_gradient_error(act, classifier.weight, classifier.bias, perms, classes,
                                                           cotangent, torch.float64)  # each side within it
    numerics.assert_within(got, expected, bound, "the engine's map gradient against autograd through the reference")


# ---- torch.compile and the README --------------------------------------------------------------


def test_a_compiled_training_step_gets_the_eager_gradients():
    model = tiny("local")
    cam = ShapCAM(model, [model[1]], **SETTINGS)
    x, y = inputs(), torch.tensor([1, 2])
    teacher = torch.rand(2, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())

    def outputs(x):
        results = cam.explain(x, [ClassifierOutputSoftmaxTarget(int(c)) for c in y], create_graph=True)
        return model(x), torch.stack([r.shapley for r in results])

    def loss(logits, maps):
        return F.cross_entropy(logits, y) + (maps - teacher).pow(2).sum()

    def step(x):
        return torch.autograd.grad(loss(*outputs(x)), params)

    torch._dynamo.reset()
    compiled = torch.compile(step)(x)
    eager = step(x)
    # Each output's own gradient and cotangent, eagerly: the terms both steps sum.
    logits, maps_ = outputs(x)
    flat = torch.cat([logits.flatten(), maps_.flatten()])
    cotangents = torch.autograd.grad(loss(logits, maps_), (logits, maps_), retain_graph=True)
    cotangents = torch.cat([c.flatten() for c in cotangents])
    per_output = [torch.autograd.grad(o, params, retain_graph=True, allow_unused=True, materialize_grads=True)
                  for o in flat]
    # the roundings: the model's layers and pool, the softmax over classes and the map's sums
    k, n, classes = 8, 8, 5
    roundings = sum(numerics.head_sums(model, n)) + k * (n + 1) + n + classes + maps_.numel() + 10
    for i, (c, e) in enumerate(zip(compiled, eager)):
        bound = numerics.reordered_gradient_error(torch.stack([g[i] for g in per_output]), cotangents, roundings,
                                                  torch.float64)
        numerics.assert_within(c, e, bound, f"compiled against eager, parameter {i}")


def readme_example() -> str:
    """The README's example of a loss on the map: the python block after its heading."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("### A loss on the map", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_trains_on_the_map():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    mask = torch.zeros(2, 8, 8)
    mask[:, 2:6, 2:6] = 1
    before = [p.detach().clone() for p in model.parameters()]
    scope = {"model": model, "layer": model[3], "x": x, "y": y, "mask": mask,
             "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    exec(readme_example(), scope)
    assert scope["maps"].grad_fn is not None
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
