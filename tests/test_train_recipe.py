"""``nexus train`` as a recipe: stage functions at module level, no closures, and the metrics arithmetic."""

from __future__ import annotations

import ast
import inspect
import types

import pytest
import torch

import nexus.engines.train as train_module
from nexus.training.step_metrics import MetricsWindow, flat_scalars, stack_sums


def _nested_functions(tree: ast.Module) -> list[str]:
    """``outer.inner`` for every function or lambda defined inside another function."""
    found = []
    for outer in ast.walk(tree):
        if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(outer):
                if node is not outer and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    found.append(f"{outer.name}.{getattr(node, 'name', '<lambda>')} (line {node.lineno})")
    return found


def test_train_defines_no_closures():
    tree = ast.parse(inspect.getsource(train_module))
    assert _nested_functions(tree) == []


def test_train_is_made_of_named_stages():
    source = inspect.getsource(train_module.train)
    calls = [name for name in ("setup(", "resume(", "open_records(", "train_loop(", "finish(") if name in source]
    assert calls == ["setup(", "resume(", "open_records(", "train_loop(", "finish("]
    positions = [source.index(name) for name in calls]
    assert positions == sorted(positions)  # in the order they run


def test_lines_are_under_120_characters():
    long = [n for n, line in enumerate(inspect.getsource(train_module).splitlines(), 1) if len(line) >= 120]
    assert long == []


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_warms_up_then_follows_the_schedule(schedule):
    config = types.SimpleNamespace(warmup_steps=2, max_steps=6, min_lr_ratio=0.1, schedule=schedule)
    factors = [train_module.lr_lambda(config)(step) for step in range(7)]
    assert factors[:2] == [0.5, 1.0]
    if schedule == "constant":
        assert factors[2:] == [1.0] * 5
    else:
        assert factors[2] == pytest.approx(1.0) and factors[6] == pytest.approx(0.1)
        assert all(a > b for a, b in zip(factors[2:6], factors[3:7]))


def _parts(ce, kd, rkl, drift=None):
    zero = torch.zeros(3)
    return types.SimpleNamespace(ce=torch.tensor(ce), kd=torch.tensor(kd), router_kl=torch.tensor(rkl),
                                 drift=drift, ent_student=zero if drift is not None else None,
                                 ent_teacher=zero if drift is not None else None)


def test_metrics_window_averages_the_loss_over_steps_and_weights_parts_by_tokens():
    window = MetricsWindow()
    # Two steps: loss 1.0 then 3.0; CE sums 4 over 2 predicted tokens, then 18 over 6.
    window.add(stack_sums(None, torch.tensor(1.0), _parts(4.0, 2.0, 0.0)), 2.0, 5.0, 0.5, False, 1)
    window.add(stack_sums(None, torch.tensor(3.0), _parts(18.0, 6.0, 3.0)), 6.0, 10.0, 1.5, True, 2)
    record = window.record(2, [1e-3, 1e-4], 15, 1, [0, 1, 2], 3)
    assert record["loss"] == pytest.approx(2.0)
    assert record["ce"] == pytest.approx(22.0 / 8) and record["kd"] == pytest.approx(1.0)
    assert record["router_kl"] == pytest.approx(3.0 / (15 * 3))
    assert record["grad_norm"] == pytest.approx(1.0) and record["sfa_merge_steps"] == [2]
    assert record["lr"] == 1e-3 and record["router_lr"] == 1e-4 and record["tokens"] == 15


def test_per_layer_router_metrics_are_flattened_for_trackers():
    window = MetricsWindow()
    sums = stack_sums(None, torch.tensor(1.0), _parts(1.0, 1.0, 1.0, drift=torch.tensor([2.0, 4.0, 6.0])))
    window.add(sums, 1.0, 2.0, 0.1, False, 1)
    record = window.record(1, [1e-3], 2, 0, [3, 5, 7], 3)
    assert record["router_layers"] == [3, 5, 7] and record["router_drift"] == [1.0, 2.0, 3.0]
    flat = flat_scalars(record)
    assert flat["router_drift/layer_5"] == 2.0 and "router_layers" not in flat and "sfa_merge_steps" not in flat
