"""eval.py against lm-eval's own Hugging Face backend (HFLM on the same random-init float32 checkpoint), all offline:
local hellaswag-, winogrande- and wikitext-format tasks (the installed lm-eval task YAMLs `include`d, with JSONL
data written here) loaded through TaskManager(include_path=...); generate_until against generate(); the CLI.
LlamaFastLM runs on --device (HFLM and the CLI on CPU)."""
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from conftest import english_ish
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

import decoding
import eval as llama_eval
from sampling import SamplingConfig
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
MAX_LENGTH = 48  # short windows: some multiple-choice requests are left-truncated, every long document is windowed
N_DOCS = 16
GEN_KWARGS = {"until": ["\n\n", "Question:"], "max_gen_toks": 12, "do_sample": False}


def write_tasks(root: Path, seed: int = 0) -> list:
    """hellaswag-, winogrande- and wikitext-format tasks (the installed YAMLs with local JSONL data) and a
    generative question-answering task; returns their names."""
    rng = random.Random(seed)
    sentences = iter(english_ish(20 * N_DOCS, seed=seed + 11))
    words = lambda n: " ".join(next(sentences).rstrip(".!?,").split()[:n])  # noqa: E731
    hellaswag, winogrande, pages, questions = [], [], [], []
    for _ in range(N_DOCS):
        hellaswag.append({"activity_label": words(1), "ctx_a": next(sentences), "ctx_b": words(4).lower(),
                          "endings": [words(6).lower() + "." for _ in range(4)], "label": str(rng.randrange(4))})
        w = next(sentences).rstrip(".!?,").split()
        k = rng.randrange(1, len(w) - 1)
        winogrande.append({"sentence": " ".join(w[:k] + ["_"] + w[k + 1:]) + ".", "option1": w[k],
                           "option2": rng.choice(w), "answer": rng.choice("12")})
        pages.append({"page": " ".join(next(sentences) for _ in range(rng.randint(1, 7)))})
        questions.append({"question": next(sentences), "answer": words(3)})
    root.mkdir(parents=True, exist_ok=True)
    specs = {"local_hellaswag": ("hellaswag/hellaswag.yaml", hellaswag), "local_winogrande": (
        "winogrande/default.yaml", winogrande), "local_wikitext": ("wikitext/wikitext.yaml", pages)}
    for name, (base, docs) in specs.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / f"{name}.yaml").write_text(
            f"include: {LM_EVAL_TASKS / base}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {root / (name + '.jsonl')}\n"
            "training_split: null\nvalidation_split: null\ntest_split: test\n")
    (root / "local_qa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in questions))
    (root / "local_qa.yaml").write_text(
        "task: local_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'local_qa.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs: {json.dumps(GEN_KWARGS)}\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return [*specs, "local_qa"]


@pytest.fixture(scope="module")
def setup(hf_checkpoint, tmp_path_factory):
    _, d = hf_checkpoint("mha")
    root = tmp_path_factory.mktemp("tasks")
    names = write_tasks(root)
    # include_defaults=False: only the tasks written here are indexed (lm-eval's ~15k YAMLs take seconds)
    return d, root, names, TaskManager(include_path=str(root), include_defaults=False)


@pytest.fixture(scope="module")
def ours(setup, load_ours):
    d = setup[0]
    return llama_eval.LlamaFastLM(load_ours(d), load_tokenizer(d / "tokenizer.model"), batch_size=3,
                                  max_length=MAX_LENGTH)


def hf_tokenizer(d: Path):
    """transformers' SentencePiece tokenizer on our tokenizer.model, BOS first like Llama's."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend(vocab_file=str(d / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", special_tokens_pattern="bos")


def hflm(d: Path, **kwargs):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(d), tokenizer=hf_tokenizer(d), dtype="float32", device="cpu", batch_size=4,
                max_length=MAX_LENGTH, **kwargs)


def loglikelihoods(samples: list) -> list:
    """(log-likelihood, is_greedy) of every request of every document (rolling: log-likelihood only)."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        for (r,) in s["resps"]:
            out.append(tuple(r) if isinstance(r, (tuple, list)) else (r,))
    return out


def test_parity_with_lm_eval_hf_backend(setup, ours):
    d, root, names, manager = setup
    tasks = names[:3]
    hf = hflm(d)
    kw = dict(tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0)
    reference = lm_eval.simple_evaluate(model=hf, **kw)
    result = lm_eval.simple_evaluate(model=ours, **kw)

    truncated = 0
    for task in tasks:
        for sample in reference["samples"][task]:  # both sides see the same tokens: this compares the models
            for args in sample["arguments"]:
                text = "".join(args)
                assert hf.tok_encode(text) == ours.tok_encode(text)
                truncated += len(ours.tok_encode(text)) > MAX_LENGTH + 1
        ref, got = loglikelihoods(reference["samples"][task]), loglikelihoods(result["samples"][task])
        assert len(got) == len(ref) >= N_DOCS
        for (lp_ref, *greedy_ref), (lp, *greedy) in zip(ref, got):
            assert lp == pytest.approx(lp_ref, abs=1e-4) and greedy == greedy_ref
    assert truncated  # some requests were left-truncated to the window
    pages = [json.loads(line)["page"] for line in (root / "local_wikitext.jsonl").read_text().splitlines()]
    n_windows = [-(-len(ours.tok_encode(p)) // MAX_LENGTH) for p in pages]
    assert max(n_windows) >= 3 and min(n_windows) == 1  # documents of one window and of several

    metrics = {"local_hellaswag": ["acc,none", "acc_norm,none"], "local_winogrande": ["acc,none"],
               "local_wikitext": ["word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"]}
    for task, keys in metrics.items():
        for key in keys:
            assert result["results"][task][key] == pytest.approx(reference["results"][task][key], rel=1e-6), key


def expected_continuation(lm, context: str, max_gen_toks: int, until=()) -> str:
    """generate() greedy on the encoded context (its last max_length - max_gen_toks tokens, as HFLM keeps), decoded
    in context, cut before the first stop string."""
    prompt = lm.tok_encode(context)[-(lm.max_length - max_gen_toks):]
    row = decoding.generate(lm.model, [prompt], max_gen_toks, SamplingConfig(temperature=0),
                            lm.tok.eos_ids).tokens[0]  # ends with EOS where the model produced one
    new = [t for t in row if t not in lm.tok.eos_ids]
    text = lm.tok.decode(prompt + new)[len(lm.tok.decode(prompt)):]
    return min((text.split(s)[0] for s in until), key=len, default=text)


def test_generate_until_equals_generate(ours):
    # different lengths (a left-padded batch), the last longer than the window leaves room for (left-truncated)
    contexts = [" ".join(english_ish(2, seed=40 + n))[:n] for n in (30, 60, 200)]
    assert [len(ours.tok_encode(c)) > MAX_LENGTH - 16 for c in contexts] == [False, False, True]
    full = [expected_continuation(ours, c, 16) for c in contexts]
    assert all(len(ours.tok_encode(f, add_special_tokens=False)) >= 8 for f in full)
    requests = [Instance("generate_until", {}, (c, {"until": ["never appears"], "max_gen_toks": 16}), i)
                for i, c in enumerate(contexts)]
    assert ours.generate_until(requests) == full

    # stop strings from the middle of each continuation cut it there; max_gen_toks cuts the token count
    stops = [f[len(f) // 2: len(f) // 2 + 2] for f in full]
    requests = [Instance("generate_until", {}, (c, {"until": [s, "never appears"], "max_gen_toks": 16}), i)
                for i, (c, s) in enumerate(zip(contexts, stops))]
    cut = ours.generate_until(requests)
    assert cut == [f[:f.index(s)] for f, s in zip(full, stops)]
    assert all(len(c) < len(f) for c, f in zip(cut, full))
    short = [Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 5}), 0) for c in contexts]
    assert ours.generate_until(short) == [expected_continuation(ours, c, 5) for c in contexts]


def test_generative_task_through_lm_eval(setup, ours):
    _, root, names, manager = setup
    result = lm_eval.simple_evaluate(model=ours, tasks=["local_qa"], task_manager=manager, log_samples=True,
                                     bootstrap_iters=0)
    samples = sorted(result["samples"]["local_qa"], key=lambda s: s["doc_id"])
    assert len(samples) == N_DOCS
    for s in samples:
        context = f"Question: {s['doc']['question']}\nAnswer:"
        assert s["resps"][0][0] == expected_continuation(ours, context, GEN_KWARGS["max_gen_toks"],
                                                         GEN_KWARGS["until"])
    assert result["results"]["local_qa"]["exact_match,none"] == 0.0  # random weights answer nothing right


def test_lm_eval_local_completions_through_the_server_scores_as_eval_does(setup, ours, tmp_path):
    """lm-eval's local-completions model (echo + logprobs, prompts of token ids, several per request) against
    serve.py: every log-likelihood as eval.py's model computes it in process. The client tokenizes with
    transformers (the checkpoint's tokenizer saved as a Hugging Face one, BOS first), as users point lm-eval at a
    server; its max_length keeps one token for generation, and one more for the last token it sends (which
    eval.py's window does not count)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from helpers import ServerProcess

    d, root, names, manager = setup
    hf_tokenizer(d).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())  # BOS first, as Llama's own config says
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "special_tokens_pattern": "bos"}))
    server = ServerProcess(d, "--model_name", "tiny")
    try:
        api = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="tiny", tokenizer=str(tmp_path),
                                  max_length=MAX_LENGTH + 2, batch_size=4, max_retries=1, add_bos_token=True)
        kw = dict(tasks=names[:3], task_manager=manager, log_samples=True, bootstrap_iters=0, limit=8)
        result = lm_eval.simple_evaluate(model=api, **kw)
    finally:
        server.stop()
    reference = lm_eval.simple_evaluate(model=ours, **kw)
    for task in names[:3]:
        ref, got = loglikelihoods(reference["samples"][task]), loglikelihoods(result["samples"][task])
        assert len(got) == len(ref) >= 8
        for (lp_ref, *greedy_ref), (lp, *greedy) in zip(ref, got):
            assert lp == pytest.approx(lp_ref, abs=1e-4) and greedy == greedy_ref, task
    # the metrics of the rolling task (the choices' accuracies follow from the log-likelihoods, but not where two
    # choices tie exactly: windows truncate their differences away, and which float is larger is then chance)
    for key, value in reference["results"]["local_wikitext"].items():
        if isinstance(value, float) and "stderr" not in key:
            assert result["results"]["local_wikitext"][key] == pytest.approx(value, rel=1e-5), key


def test_scoring_through_an_int8_kv_cache(setup, load_ours, tmp_path):
    """--kv_cache_dtype int8 scores through the int8 cache: each window's log-likelihood is what transformers'
    model gives with its keys (after RoPE) and values rounded as the cache stores them (an attention function of
    ours registered in transformers' AttentionInterface), not what the float cache gives."""
    from transformers import AttentionInterface, LlamaForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from llama_fast.quant.kv_cache import dequantize, quantize
    d = setup[0]
    lm = llama_eval.LlamaFastLM(load_ours(d), load_tokenizer(d / "tokenizer.model"), batch_size=2,
                                max_length=MAX_LENGTH, kv_cache_dtype="int8")
    requests = [(None, lm.tok_encode(text), lm.tok_encode(text, add_special_tokens=False)[:5])
                for text in english_ish(3, seed=8)]

    def rounded(module, query, key, value, *args, **kwargs):
        key, value = (dequantize(*quantize(x), x.dtype) for x in (key, value))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)
    AttentionInterface.register("int8_kv", rounded)
    hf_model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="int8_kv").eval()
    plain = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    got = lm._loglikelihood_tokens(requests)
    for (_, context, continuation), (logprob, _) in zip(requests, got):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            want, float_cache = (m(ids[:, :-1]).logits[0, -len(continuation):].log_softmax(-1)
                                 .gather(-1, ids[0, -len(continuation):, None]).sum().item()
                                 for m in (hf_model, plain))
        assert logprob == pytest.approx(want, rel=1e-4, abs=1e-4) and logprob != pytest.approx(float_cache, rel=1e-7)


def test_text_perplexity(setup, ours, tmp_path):
    d = setup[0]
    long_text = "\n".join(english_ish(12, seed=5))
    path = tmp_path / "text.txt"
    path.write_text(long_text)
    got = llama_eval.text_perplexity(ours, path)
    tokens = ours.tok_encode(long_text, add_special_tokens=False)
    assert got["tokens"] == len(tokens) > 3 * MAX_LENGTH and got["bytes"] == len(long_text.encode())
    # reference: lm-eval's HF backend, told not to put BOS into the document (BOS stays the prefix token)
    ref = hflm(d, add_bos_token=False).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_text,), 0)])
    nll = -ref[0]
    assert got["token_perplexity"] == pytest.approx(math.exp(nll / len(tokens)), rel=1e-5)
    assert got["word_perplexity"] == pytest.approx(math.exp(nll / len(long_text.split())), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / got["bytes"] / math.log(2), rel=1e-5)

    # within one window: exactly the sum of log P(token | BOS, earlier tokens) from transformers' model
    short = " ".join(english_ish(1, seed=6)[0].split()[:6])
    path.write_text(short)
    ids = ours.tok_encode(short, add_special_tokens=False)
    assert 4 < len(ids) <= MAX_LENGTH
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf_model(torch.tensor([[ours.prefix_token_id] + ids[:-1]])).logits[0]
    nll = -logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).sum().item()
    assert llama_eval.text_perplexity(ours, path)["token_perplexity"] == pytest.approx(math.exp(nll / len(ids)),
                                                                                        rel=1e-5)


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_int8_end_to_end(setup, tmp_path):
    d, root, names, manager = setup
    for name in ("model.pth", "model_config.json", "tokenizer.model"):  # quantized in a folder of its own
        shutil.copyfile(d / name, tmp_path / name)
    proc = subprocess.run([sys.executable, "quantize.py", "--checkpoint_path", tmp_path / "model.pth", "--mode",
                           "int8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    int8 = tmp_path / "model_int8.pth"
    text = tmp_path / "text.txt"
    text.write_text("\n".join(english_ish(6, seed=9)))
    out = tmp_path / "results.json"
    proc = run_cli("--checkpoint_path", int8, "--tasks", "local_hellaswag", "local_wikitext", "--include_path",
                   root, "--limit", 8, "--batch_size", 2, "--max_seq_length", MAX_LENGTH, "--precision", "float32",
                   "--device", "cpu", "--text_file", text, "--output_path", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "local_hellaswag" in proc.stdout and "acc_norm" in proc.stdout and "word_perplexity" in proc.stdout
    results = json.loads(out.read_text())
    assert results["llama_fast"]["quantization"] == "int8"
    assert not list(tmp_path.glob(".*.tmp*"))  # written through a temporary file and renamed

    # the same numbers in-process, from the int8 model through LlamaFastLM
    model, tok = llama_eval.load(int8, None, "cpu", torch.float32)
    lm = llama_eval.LlamaFastLM(model, tok, batch_size=2, max_length=MAX_LENGTH)
    expected = lm_eval.simple_evaluate(model=lm, tasks=names[:3:2], task_manager=manager, limit=8,
                                       bootstrap_iters=0, log_samples=False)
    for task in names[:3:2]:
        assert results["results"][task]["sample_len"] == 8
        for key, value in expected["results"][task].items():
            if isinstance(value, float):
                assert results["results"][task][key] == pytest.approx(value, rel=1e-6), key
    for key, value in llama_eval.text_perplexity(lm, text).items():
        assert results["text_perplexity"][key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "local_hellaswag", "--limit", "0"], "--limit"),
    (["--tasks", "local_hellaswag", "--limit", "2.5"], "--limit"),
    ([], "nothing to evaluate"),
    (["--tasks", "local_hellaswag", "--checkpoint_path", "nope/model.pth"], "checkpoint not found"),
    (["--text_file", "nope.txt"], "text file not found"),
    (["--text_file", __file__, "--max_seq_length", "1000"], "exceeds the model's context of 256"),
    (["--tasks", "local_helaswag"], "unknown task 'local_helaswag'; did you mean local_hellaswag"),
    # checked before the model loads and any scoring starts (the test would take minutes otherwise)
    (["--text_file", __file__, "--output_path", "no_such_folder/results.json"], "no_such_folder does not exist"),
    (["--text_file", __file__, "--output_path", "."], "is a folder"),
])
def test_user_mistakes(setup, args, message, capsys):
    d, root, _, _ = setup
    tasks = ["--include_path", root] if "--tasks" in args else []  # (--include_path alone is refused)
    argv = ["--checkpoint_path", d / "model.pth", *tasks, "--device", "cpu", *args]
    with pytest.raises(SystemExit) as e:
        llama_eval.main(list(map(str, argv)))
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code)


def test_compiled_scoring_equals_eager(ours):
    torch._dynamo.reset()
    compiled = llama_eval.LlamaFastLM(ours.model, ours.tok, batch_size=3, max_length=MAX_LENGTH, compile=True)
    pairs = [(s, " " + t) for s, t in zip(english_ish(5, seed=60), english_ish(5, seed=61))]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]  # batches of 3 and 2
    documents = [Instance("loglikelihood_rolling", {}, (" ".join(english_ish(4, seed=62)),), 0)]
    for (lp, greedy), (lp_ref, greedy_ref) in zip(compiled.loglikelihood(requests), ours.loglikelihood(requests)):
        assert lp == pytest.approx(lp_ref, abs=1e-4) and greedy == greedy_ref
    assert compiled.loglikelihood_rolling(documents) == pytest.approx(ours.loglikelihood_rolling(documents), abs=1e-4)
    torch._dynamo.reset()


def test_qwen2_with_tokenizer_json_matches_lm_eval_hf_backend(setup, hf_checkpoint, chatml_tokenizer_dir,
                                                              load_ours):
    """A Qwen2 model (Q/K/V biases, tied embeddings) whose tokenizer is a tokenizer.json with no BOS: documents are
    conditioned on EOS as HFLM conditions them, and every log-likelihood equals HFLM's on the HF model."""
    from transformers import AutoTokenizer

    _, root, names, manager = setup
    _, d = hf_checkpoint("qwen2")
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(d), tokenizer=AutoTokenizer.from_pretrained(chatml_tokenizer_dir), dtype="float32",
              device="cpu", batch_size=4, max_length=MAX_LENGTH)
    tok = load_tokenizer(chatml_tokenizer_dir / "tokenizer.json")
    assert tok.bos_id is None
    ours = llama_eval.LlamaFastLM(load_ours(d), tok, batch_size=3, max_length=MAX_LENGTH)
    assert ours.prefix_token_id == hf.prefix_token_id == tok.eos_ids[0]
    kw = dict(tasks=names[:3], task_manager=manager, log_samples=True, bootstrap_iters=0, limit=6)
    reference, result = lm_eval.simple_evaluate(model=hf, **kw), lm_eval.simple_evaluate(model=ours, **kw)
    for task in names[:3]:
        ref, got = loglikelihoods(reference["samples"][task]), loglikelihoods(result["samples"][task])
        assert len(got) == len(ref) > 0
        for (lp_ref, *greedy_ref), (lp, *greedy) in zip(ref, got):
            assert lp == pytest.approx(lp_ref, abs=1e-4) and greedy == greedy_ref
