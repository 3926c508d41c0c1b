"""``collect`` on SIGINT/SIGTERM: the statistics so far are saved, the error says how to resume
(exit status 130/143), and the same call then finishes them as one uninterrupted run would."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from nexus.data import TokenData
from nexus.engines.collect import CollectArgs, collect_router_stats
from nexus.router_stats import RouterStats
from nexus.errors import Interrupted


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_collect_saves_its_statistics_and_resumes(gpt_oss_mxfp4_dir, gpt_oss, tmp_path, sig, code):
    from nexus.loading import load_model

    model = load_model(gpt_oss_mxfp4_dir)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 40, (12,), generator=g)
    data = TokenData([torch.randint(1, 200, (int(n),), generator=g).tolist() for n in lengths], pad_id=0)
    args = CollectArgs(batch_size=3, checkpoint_every=0)
    straight = collect_router_stats(model, gpt_oss, data, args, tmp_path / "straight", progress=False)

    calls = {"n": 0}

    def signal_on_second_batch(module, inputs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), sig)

    hook = model.register_forward_pre_hook(signal_on_second_batch)
    try:
        expected = f"stopped by {signal.Signals(sig).name} .*run the same command again"
        with pytest.raises(Interrupted, match=expected) as info:
            collect_router_stats(model, gpt_oss, data, args, tmp_path / "resumed", progress=False)
    finally:
        hook.remove()
    assert info.value.exit_code == code
    saved = RouterStats.load(tmp_path / "resumed")
    assert not saved.meta["complete"] and saved.meta["next_batch"] == 2 and 0 < saved.tokens < straight.tokens
    done = collect_router_stats(model, gpt_oss, data, args, tmp_path / "resumed", progress=False)
    assert done.meta["complete"] and done.tokens == straight.tokens
    for layer in straight.layers:
        torch.testing.assert_close(done.layers[layer].sum_pp, straight.layers[layer].sum_pp, rtol=1e-12, atol=1e-12)
