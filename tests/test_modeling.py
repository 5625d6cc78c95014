"""Model loading checks, LoRA targets by architecture, and every PEFT method building and learning on a tiny model."""
from __future__ import annotations

import pytest
import torch

from peft_tuner.config import PEFT_METHODS, ModelConfig, PeftSettings
from peft_tuner.modeling import (ModelError, add_neftune_noise, build_peft_model, count_parameters, load_base_model,
                                 resolve_model_source, resolve_target_modules)


@pytest.mark.parametrize("arch,expected", [("gpt2", ["c_attn"]), ("bloom", ["query_key_value"]), ("opt", ["q_proj", "v_proj"]),
                                           ("llama", ["q_proj", "v_proj"])])
def test_default_lora_targets_by_architecture(tiny_models, arch, expected):
    model = load_base_model(ModelConfig(name_or_path=str(tiny_models[arch])))
    assert resolve_target_modules(model, PeftSettings()) == expected


def test_a_target_that_matches_nothing_lists_the_linear_layers(tiny_models):
    model = load_base_model(ModelConfig(name_or_path=str(tiny_models["llama"])))
    with pytest.raises(ModelError, match=r"\['qkv'\] match no module of this llama model; its linear layers are: "
                                         r"down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        resolve_target_modules(model, PeftSettings(target_modules=["qkv"]))


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_every_method_builds_and_learns(tiny_models, method):
    """A few AdamW steps on one batch lower the loss, and only the method's parameters change."""
    from peft_tuner.data import collate

    model = build_peft_model(load_base_model(ModelConfig(name_or_path=str(tiny_models["llama"]))),
                             PeftSettings(method=method, r=4, num_virtual_tokens=4, dropout=0.0),
                             ModelConfig(name_or_path=str(tiny_models["llama"])), total_steps=10)
    trainable, total = count_parameters(model)
    assert 0 < trainable <= total and (trainable == total) == (method == "full")
    batch = collate([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                     {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}], pad_token_id=2)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0], losses
    now = dict(model.named_parameters())
    assert all(torch.equal(now[name], value) for name, value in frozen.items())  # the base model stays as it was
    assert all(not torch.equal(now[name], value) for name, value in trained.items())  # every trained one moved
    assert (len(frozen) == 0) == (method == "full")


def test_neftune_noise_is_bounded_and_only_while_training(tiny_models):
    """alpha/sqrt(length*hidden) bounds the noise on the input embeddings; eval() sees the clean ones; removing the hook
    restores the model exactly."""
    model = build_peft_model(load_base_model(ModelConfig(name_or_path=str(tiny_models["llama"]))), PeftSettings(r=4),
                             ModelConfig(name_or_path=str(tiny_models["llama"])), total_steps=1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    embeddings = model.get_input_embeddings()
    clean = embeddings(ids).detach()
    assert add_neftune_noise(model, 0.0) == []
    (handle,) = add_neftune_noise(model, 5.0)
    bound = 5.0 / (clean.shape[1] * clean.shape[2]) ** 0.5
    model.train()
    noisy = embeddings(ids).detach()
    assert 0 < (noisy - clean).abs().max() <= bound
    assert (noisy - clean).abs().mean() > bound / 4  # uniform in [-bound, bound]: mean |noise| is bound / 2
    model.eval()
    assert torch.equal(embeddings(ids), clean)
    handle.remove()
    model.train()
    assert torch.equal(embeddings(ids), clean)


def test_neftune_noise_of_a_padding_free_batch_takes_each_rows_own_length(tiny_models):
    """Two rows of 3 and 9 tokens packed as one sequence: each row's noise is bounded by alpha/sqrt(its own length x
    hidden), as that row alone would get, not by the packed length's smaller bound."""
    model_cfg = ModelConfig(name_or_path=str(tiny_models["llama"]))
    model = build_peft_model(load_base_model(model_cfg), PeftSettings(r=4), model_cfg, total_steps=1).train()
    ids = torch.arange(5, 17)[None]
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    embeddings = model.get_input_embeddings()
    seen = []
    handles = add_neftune_noise(model, 5.0, padding_free=True)
    embeddings.register_forward_hook(lambda module, args, out: seen.append(out.detach()))  # after the noise
    torch.manual_seed(0)
    model(input_ids=ids, position_ids=positions)
    clean = embeddings.weight[ids].detach()
    noise = (seen[-1] - clean)[0].abs()
    hidden = clean.shape[-1]
    for (a, b) in ((0, 3), (3, 12)):
        bound = 5.0 / ((b - a) * hidden) ** 0.5
        assert bound * 0.9 < float(noise[a:b].max()) <= bound * (1 + 1e-6), (a, b)
    assert float(noise[0:3].max()) > 5.0 / (12 * hidden) ** 0.5 * 1.5  # the packed length would have bounded it lower
    for handle in handles:
        handle.remove()


def test_missing_model_path_and_fake_gguf_are_refused_before_loading(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_source(ModelConfig(name_or_path=str(tmp_path / "nope")))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        resolve_model_source(ModelConfig(name_or_path=str(fake)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_source(ModelConfig(name_or_path=str(tmp_path / "empty")))


def test_the_lm_head_gets_a_contiguous_input_when_only_the_last_position_is_kept(tiny_models):
    """Scoring and generation keep only the last position (logits_to_keep=1), a non-contiguous slice; with the head's
    weight frozen, torch then multiplies by one copy of the weight per row (3.4x slower rank classification on
    SmolLM2). Every model we load hands the head a contiguous input."""
    model = load_base_model(ModelConfig(name_or_path=str(tiny_models["llama"]))).eval().requires_grad_(False)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), logits_to_keep=1)
    assert seen == [True]


