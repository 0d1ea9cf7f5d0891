"""Mixture of experts (Mixtral; Qwen3-MoE): beyond the HF parity of tests/test_model.py (logits, greedy, KV cache,
for both families), the two expert paths agree, quantized experts stay within a stated error of float, a batch of
different prompts decodes as each alone, compiled equals HF through the command line, and 2 processes (gloo) compute
what one does."""
import shutil

import pytest
import torch
from conftest import hf_greedy

import decoding
from llama_fast import checkpoint
from llama_fast.quant import qlinear as Q
from model import Experts, MoEFeedForward
from model_config import CONFIG_NAME
from sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request, hf_checkpoint, load_cpu):
    hf, d = hf_checkpoint(request.param)
    return request.param, hf, d, load_cpu(d)


def test_gathered_and_grouped_experts_agree(moe):
    """Decoding gathers each token's experts, prefill groups tokens by expert: the same FFN either way."""
    _, _, _, model = moe
    ffn = model.layers[0].feed_forward
    assert isinstance(ffn, MoEFeedForward) and isinstance(ffn.w13, Experts)
    x = torch.randn(40, model.config.dim, generator=torch.Generator().manual_seed(0))
    probs = ffn.gate(x).float().softmax(-1)
    weights, experts = probs.topk(ffn.k, dim=-1)
    if ffn.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    assert len(experts.unique()) == model.config.n_experts  # every expert gets tokens
    torch.testing.assert_close(ffn.gathered(x, experts, weights), ffn.grouped(x, experts, weights), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(ffn(x[None]), ffn.grouped(x, experts, weights)[None], atol=0, rtol=0)  # 40 tokens


def test_batch_of_different_prompts_equals_each_alone(moe, prompt_ids):
    _, _, _, model = moe
    prompts = [prompt_ids(n, seed=30 + n) for n in (25, 9, 17)]
    batch = decoding.generate(model, prompts, 16, GREEDY, eos_ids=()).tokens
    assert batch == [decoding.generate(model, [p], 16, GREEDY, eos_ids=()).tokens[0] for p in prompts]


def quantized_error(model, d, mode: str, x, tmp_path) -> tuple[float, object]:
    """Round-to-nearest `mode` (groups of 32) through a real quantized file: (the median over positions of the mean
    |logit error| / the logits' std, the loaded quantized model). The median: a token whose experts change under
    quantization (measured: about 1 in 50 tokens per layer) moves further than the rest."""
    state, meta = Q.quantize_model(model, mode, groupsize=32, progress=False)
    for f in (CONFIG_NAME, "tokenizer.model"):
        shutil.copyfile(d / f, tmp_path / f)
    torch.save({"quantization": meta, "state_dict": state}, tmp_path / f"{mode}.pth")
    quantized = checkpoint.load_model(tmp_path / f"{mode}.pth", "cpu", torch.float32)
    ref = model(x)
    return ((quantized(x) - ref).abs().mean(-1) / ref.std()).median().item(), quantized


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_experts_within_bound(moe, mode, hf_checkpoint, load_cpu, prompt_ids, tmp_path):
    """int8 / int4 of every linear and every expert (not the router): the logit error stays within twice what the
    same quantization does to the dense model of the same shape (measured, median error / logit spread: dense int8
    1.7%, int4 21%; Mixtral 2.8%, 22%; Qwen3-MoE 1.4%, 19%, on these tiny random models)."""
    name, _, d, model = moe
    x = torch.tensor([prompt_ids(48, seed=3)])
    err, quantized = quantized_error(model, d, mode, x, tmp_path)
    _, dense_dir = hf_checkpoint("gqa")
    (tmp_path / "dense").mkdir()
    dense_err, _ = quantized_error(load_cpu(dense_dir), dense_dir, mode, x, tmp_path / "dense")
    assert err < 2 * dense_err, (name, mode, err, dense_err)
    assert type(quantized.layers[0].feed_forward.w13).__name__ == f"{mode.capitalize()}Experts"
    assert quantized.quantization["layers"]["layers.0.feed_forward.w13"] == mode
    assert "layers.0.feed_forward.gate" not in quantized.quantization["layers"]  # the router stays float
    assert decoding.generate(quantized, [x[0].tolist()], 8, GREEDY).tokens  # the gathered path decodes


def test_compiled_command_line_matches_hf(moe):
    from helpers import BASE, assert_ran_cleanly, run_cli
    from tokenizer import load_tokenizer

    name, hf, d, _ = moe
    tok = load_tokenizer(d / "tokenizer.model")
    text = "The quick dog sees a red bird and the old farmer walks"
    ids = tok.encode(text)
    ref = hf_greedy(hf, [ids], 32)[0]
    proc = run_cli("--checkpoint_path", d / "model.pth", "--prompt", text, *BASE, "--max_new_tokens", "32",
                   "--ignore_eos", "--compile")
    assert_ran_cleanly(proc)
    assert proc.stdout == tok.decode(ids + ref) + "\n", name


def test_two_processes_compute_what_one_does(hf_checkpoint, load_cpu, sp_tokenizer, tmp_path):
    """Experts sharded along their intermediate dimension (gpt-fast's way), the router replicated: float32 and
    int8 Mixtral over 2 gloo processes give one process's logits and greedy tokens."""
    from helpers import TP_PROMPT, torchrun

    _, d = hf_checkpoint("mixtral")
    state, meta = Q.quantize_model(load_cpu(d), "int8", progress=False)
    torch.save({"quantization": meta, "state_dict": state}, d / "model_int8.pth")
    paths = [d / "model.pth", d / "model_int8.pth"]
    prompt = sp_tokenizer.encode(TP_PROMPT)
    out = tmp_path / "tp.pt"
    proc = torchrun("tests/tp_worker.py", out, ",".join(map(str, prompt)), 16, *paths)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(out, weights_only=True)
    for path in paths:
        model = checkpoint.load_model(path, "cpu", torch.float32)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt]))
        torch.testing.assert_close(results[str(path)]["logits"], logits, atol=1e-5, rtol=0)
        assert results[str(path)]["tokens"] == decoding.generate(model, [prompt], 16, GREEDY).tokens[0]


def test_speculative_decoding_on_top(moe, prompt_ids, tmp_path):
    """Speculative decoding runs unchanged on a MoE target (its K+1-token verify forwards take the grouped path):
    drafted by its own int8 copy, greedy output is plain greedy's, and drafts are accepted."""
    from llama_fast.speculate.speculative import DraftModel, speculative_generate

    _, _, d, model = moe
    _, draft = quantized_error(model, d, "int8", torch.tensor([prompt_ids(8)]), tmp_path)
    prompt = prompt_ids(20, seed=5)
    plain = decoding.generate(model, [prompt], 24, GREEDY).tokens
    result = speculative_generate(model, [prompt], 24, GREEDY, proposer=DraftModel(draft), speculate_k=4)
    assert result.tokens == plain and sum(result.accepted) > 0


def test_eval_scores_a_document_as_hf(moe):
    """eval.py's lm-eval model runs unchanged on a MoE: the log-likelihood of a document (one scoring window, so
    the grouped expert path) is the sum of HF's log-probabilities of its tokens, BOS first and conditioned on BOS
    (as lm-eval's HF backend scores a rolling document encoded with BOS)."""
    import torch.nn.functional as F
    from conftest import english_ish
    from lm_eval.api.instance import Instance

    import eval as llama_eval
    from tokenizer import load_tokenizer

    _, hf, d, model = moe
    tok = load_tokenizer(d / "tokenizer.model")
    text = english_ish(1, seed=8)[0]
    ids = tok.encode(text, bos=False)
    assert 8 < len(ids) < 63
    lm = llama_eval.LlamaFastLM(model, tok, batch_size=2, max_length=64)
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    targets = [tok.bos_id] + ids
    with torch.no_grad():
        logprobs = F.log_softmax(hf(torch.tensor([[tok.bos_id] + targets])).logits[0, :-1].float(), dim=-1)
    assert got == pytest.approx(logprobs.gather(1, torch.tensor(targets)[:, None]).sum().item(), abs=1e-3)
