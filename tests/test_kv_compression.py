"""KV-cache presses inside models (issue 27, second part): measured bytes held, per-layer
plumbing through models/hf_decode.py (a tiny Llama, and SmolLM2 where it is fetched), the
shared-context multi-turn task, the press.ratio / press.setting shorthand and its errors."""
import math
import string

import pytest
import torch

transformers = pytest.importorskip("transformers")

from methods.decode import KVCache  # noqa: E402
from models import hf_decode, pretrained  # noqa: E402
from runners import with_press  # noqa: E402
from tasks import multiturn  # noqa: E402

HAVE_SMOL = (pretrained.cache_dir() / "smollm2_135m" / "MANIFEST.json").exists()
needs_smol = pytest.mark.skipif(not HAVE_SMOL, reason="SmolLM2 is not fetched (python scripts/fetch_assets.py)")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared, loaded CPU two threads make each small op ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- measured bytes ----------------------------------------------------------------------------------
def test_bytes_held_are_the_bytes_of_the_tensors_the_cache_owns():
    """A hand-built cache, compacted to ragged heads (-1 slots) with an index added: bytes_held is
    the sum of the storages of K, V and the index, and the count written here."""
    B, Hkv, D, cap, L = 2, 3, 8, 20, 12
    c = KVCache(B, Hkv, D, cap, torch.float16)
    c.append(torch.randn(B, Hkv, L, D).half(), torch.randn(B, Hkv, L, D).half())
    keep = torch.tensor([[0, 3, 5, 11], [1, 2, -1, -1], [4, 7, 9, -1]]).expand(B, -1, -1)
    c.compact(keep)
    c.aux["slot_bias"] = torch.zeros(B, Hkv, c.capacity)
    storages = sum(t.untyped_storage().nbytes() for t in (c.k, c.v, c.aux["slot_bias"]))
    n, spare = 4, cap - L
    assert c.bytes_held() == storages == 2 * B * Hkv * (n + spare) * D * 2 + B * Hkv * (n + spare) * 4


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama4")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_session_memory_is_measured_from_every_layer_cache(tiny_llama):
    P, N = 40, 5
    model = hf_decode.load(tiny_llama, "streaming_llm_press", ratio=0.75)
    s = hf_decode.Session(model, P + N)
    logits = s.prefill(torch.randint(0, 64, (1, P), generator=torch.Generator().manual_seed(0)))
    s.feed(logits.argmax(-1, keepdim=True).expand(1, N - 1))
    mem = s.memory()
    kept = int(P * 0.25)
    per_layer = 2 * 1 * 2 * (kept + N) * 8 * 4  # K and V, B=1, Hkv=2, slots kept + room for N, D=8, fp32
    assert mem["kv_bytes_held_prefill"] == mem["kv_bytes_held_end"] == 4 * per_layer
    assert mem["kv_bytes_dense"] == 4 * 2 * 2 * (P + N) * 8 * 4
    assert mem["kv_bytes_held_prefill"] == sum(la.kv.k.nbytes + la.kv.v.nbytes for la in s.cache.layers)


# ---- per layer ---------------------------------------------------------------------------------------
def _pyramid(L, ratio, layers, beta=20.0, w=64):
    """PyramidKV's budget per layer (kvpress's PyramidKVPress), written out again."""
    a = L * (1 - ratio)
    lo, hi = a / beta, 2 * a - a / beta
    if hi >= L - w:
        hi, lo = L - w, 2 * a - (L - w)
    if not (L >= hi >= lo >= w):
        return [max(1, round(a))] * layers
    return [round(hi - i * (hi - lo) / (layers - 1)) for i in range(layers)]


def test_pyramidkv_in_a_model_gets_its_layer_and_the_model_depth(tiny_llama):
    P = 120
    model = hf_decode.load(tiny_llama, "pyramidkv", ratio=0.5, window_size=16)  # config num_layers 32: replaced
    g = hf_decode.generate(model, torch.randint(0, 64, (1, P), generator=torch.Generator().manual_seed(0)), 2)
    want = _pyramid(P, 0.5, 4, w=16)
    assert want[0] > want[-1]
    assert [s["kept_per_head"] for s in g.stats] == want
    assert [s["bytes_held"] for s in g.stats] == [2 * 2 * (n + 2) * 8 * 4 for n in want]


def test_random_press_draws_differently_per_layer(tiny_llama):
    s = hf_decode.Session(hf_decode.load(tiny_llama, "random_press", ratio=0.5), 60)
    s.prefill(torch.randint(0, 64, (1, 60), generator=torch.Generator().manual_seed(0)))
    kept = [la.kv.head_positions()[0].sort(-1).values for la in s.cache.layers]
    assert not torch.equal(kept[0], kept[1])


def test_fastgen_gets_the_token_classes_of_the_prompt(tiny_llama):
    """Through a Session with classes, FastGen's policy 'special' keeps exactly the special ids
    (and the first token), 'special+punct' those and the punctuation ids: recovery 1e-3 makes
    the cheapest policy win in every head."""
    ids = torch.randint(0, 64, (1, 50), generator=torch.Generator().manual_seed(3))
    special, punct = torch.tensor([7]), torch.tensor([1, 2, 3])
    s = hf_decode.Session(hf_decode.load(tiny_llama, "fastgen", recovery=1e-3), 50, classes=(special, punct))
    s.prefill(ids)
    want = sorted({0} | {i for i in range(50) if int(ids[0, i]) == 7})
    for la in s.cache.layers:
        assert la.path.policies == [["special", "special"]]
        hp = la.kv.head_positions()[0]
        for h in range(2):
            assert sorted(p for p in hp[h].tolist() if p >= 0) == want
    s2 = hf_decode.Session(hf_decode.load(tiny_llama, "fastgen", recovery=1e-3), 50, classes=(torch.tensor([], dtype=torch.long), punct))
    s2.prefill(ids)
    assert sorted(p for p in s2.cache.layers[0].kv.head_positions()[0, 0].tolist() if p >= 0) == [0]


def test_token_classes_of_a_tokenizer():
    tok = transformers.AutoTokenizer.from_pretrained(next((pretrained.cache_dir() / "smollm2_135m" / "hf").iterdir())) \
        if HAVE_SMOL else pytest.skip("SmolLM2 is not fetched")
    special, punct = hf_decode.token_classes(tok)
    for c in ".,;:?!)(":
        (i,) = tok(c, add_special_tokens=False).input_ids
        assert i in punct.tolist()
    assert tok.convert_tokens_to_ids("<|im_start|>") in special.tolist()
    for w in (" the", "abc", "7"):
        assert all(i not in punct.tolist() for i in tok(w, add_special_tokens=False).input_ids)


# ---- the real model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_path():
    if not HAVE_SMOL:
        pytest.skip("SmolLM2 is not fetched")
    return str(pretrained.checkpoint("smollm2_135m")[0])


def _prose(tok, n, skip=2000):
    from tasks import real_text

    return real_text.essay_tokens(tok, skip + n)[skip:]


@needs_smol
def test_pyramidkv_on_smollm2_keeps_budgets_decreasing_with_depth(smol_path):
    model = pretrained.load("smollm2_135m", method=_cfg("pyramidkv", ratio=0.5))
    L = 400
    s = hf_decode.Session(model, L + 1)
    s.prefill(torch.tensor([_prose(pretrained_tok(smol_path), L)]))
    kept = [la.path.last_kept for la in s.cache.layers]
    assert kept == _pyramid(L, 0.5, 30) and kept[0] > kept[15] > kept[-1]
    held = [la.kv.bytes_held() for la in s.cache.layers]
    assert all(a >= b for a, b in zip(held, held[1:])) and held[0] > held[-1]


def pretrained_tok(path):
    return transformers.AutoTokenizer.from_pretrained(path)


def _cfg(name, **kw):
    import methods

    cfg = methods.compose_method(name)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@needs_smol
def test_fastgen_on_smollm2_sees_the_punctuation_of_the_prompt(smol_path, monkeypatch):
    from methods.fastgen import FastGen

    seen = []
    orig = FastGen.set_token_classes
    monkeypatch.setattr(FastGen, "set_token_classes", lambda self, sp=None, pu=None: (seen.append((sp, pu)),
                                                                                      orig(self, sp, pu))[1])
    from models.smollm2_135m import SmolLM2

    lm = SmolLM2(method=_cfg("fastgen"))
    ids = _prose(lm.tokenizer, 120)
    lm.session(121).prefill(torch.tensor([ids]))
    want = [i for i, t in enumerate(ids) if lm.tokenizer.decode([t]).strip() and
            all(c in string.punctuation for c in lm.tokenizer.decode([t]).strip())]
    assert len(want) >= 3 and len(seen) == 30  # every layer got the prompt's classes
    for sp, pu in seen:
        assert pu[0].nonzero().flatten().tolist() == want
        assert sp[0].nonzero().flatten().tolist()[:1] == [0]


@needs_smol
def test_razor_calibration_on_real_text_picks_the_heads_of_largest_induction(smol_path):
    """calibrate() on 128 prose tokens repeated twice: per layer the echo and induction scores
    equal those computed here from the captured q/k (dense softmax written out), the retrieval
    heads are the top-scoring ones of the whole model, and some layer holds a strong induction
    head (as LLMs do)."""
    from tasks import real_text
    from tasks.capture import capture

    tok = pretrained_tok(smol_path)
    ids, P = real_text.calibration_ids(tok, "repeated", 128)
    model = hf_decode.load(smol_path, method_cfg=_cfg("razor_attention"))
    got = hf_decode.calibrate(model, ids, P)
    assert sorted(got) == list(range(30))
    from models import hf

    dense = hf.load(smol_path, "dense", impl="reference")
    with torch.no_grad(), capture(dense, layers=[3, 20]) as qkv:
        dense(input_ids=ids, logits_to_keep=1)
    for layer in (3, 20):
        q, k, _ = qkv[layer][0]
        s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double().repeat_interleave(3, 1)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.ones(2 * P, 2 * P, dtype=torch.bool).triu(1), -math.inf).softmax(-1)[0]
        ind = torch.stack([s[:, i, i - P + 1] for i in range(P, 2 * P - 1)], 1).mean(1).view(3, 3).amax(1)
        echo = torch.stack([s[:, i, i - P] for i in range(P, 2 * P)], 1).mean(1).view(3, 3).amax(1)
        torch.testing.assert_close(torch.tensor(got[layer]["induction"]), ind.float(), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(torch.tensor(got[layer]["echo"]), echo.float(), rtol=1e-3, atol=1e-4)
    # the retrieval heads: of all 30 x 3 = 90 KV heads, the round(90 x 0.14) = 13 of largest induction
    # score plus the round(90 x 0.01) = 1 of largest echo score (ranked together, not per layer)
    ranked = lambda key: sorted(((v[key][h], li, h) for li, v in got.items() for h in range(3)), reverse=True)  # noqa: E731
    want = {(li, h) for _, li, h in ranked("induction")[:13]} | {(li, h) for _, li, h in ranked("echo")[:1]}
    assert {(li, h) for li, v in got.items() for h in v["retrieval_heads"]} == want
    assert any(not v["retrieval_heads"] for v in got.values())  # some layers keep no head whole
    assert max(max(v["induction"]) for v in got.values()) > 0.3


# ---- multi-turn ----------------------------------------------------------------------------------------
@needs_smol
def test_multiturn_conversation_is_the_chat_template(smol_path):
    tok = pretrained_tok(smol_path)
    hay = _prose(tok, 1500, skip=0)
    t = multiturn.make_trial(tok, hay, 300, needles=3, turns=2, seed=1)
    assert len(t["context"]) == 300 and len(set(t["keys"])) == 2
    text = tok.decode(t["context"] + t["prompts"][0] + t["answers"][0] + t["prompts"][1] + t["answers"][1])
    for k, v in zip(t["keys"], t["values"]):
        assert f"The special magic number for {k} is {v}." in text  # the needle, in the context
        assert f"<|im_start|>assistant\nThe special magic number for {k} is {v}" in text  # its turn
    assert text.startswith("<|im_start|>system") and text.count("<|im_start|>user") == 2


class _FakeSession:
    def __init__(self, log):
        self.log = log

    def prefill(self, ids):
        self.log.append(("prefill", ids.shape[1]))
        return torch.zeros(1, 10)

    def feed(self, ids):
        self.log.append(("feed", ids.shape[1]))
        return [torch.zeros(1, 10)] * ids.shape[1]

    def step(self, t):
        self.log.append(("step", 1))
        return torch.zeros(1, 10)

    def memory(self):
        return {"kv_bytes_held_prefill": 1, "kv_bytes_held_end": 1, "kv_bytes_dense": 2}

    def stats(self):
        return [{"press": "x", "ratio": 0.5}]


class _FakeModel(torch.nn.Module):
    pressed = True

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.log, self.press_log = [], []

    def session(self, tokens):
        self.log.append(("tokens", tokens))
        return _FakeSession(self.log)


@pytest.mark.parametrize("setting", ["query_agnostic", "query_aware"])
def test_multiturn_compresses_once_and_the_setting_decides_the_prefill(setting):
    trial = {"context": [1] * 30, "prompts": [[2] * 5, [3] * 4], "answers": [[4, 4], [5, 5, 5]]}
    m = _FakeModel()
    preds = multiturn.answer_turns(m, trial, setting)
    assert [len(p) for p in preds] == [3, 4]  # each answer's positions and one past
    prefill = 35 if setting == "query_aware" else 30
    assert m.log[0] == ("tokens", 30 + 5 + 4 + 2 + 3) and m.log[1] == ("prefill", prefill)
    assert [e for e in m.log if e[0] == "prefill"] == [("prefill", prefill)]  # one prefill: compressed once
    fed = sum(n for op, n in m.log[2:] if op in ("feed", "step"))
    assert prefill + fed == 30 + 5 + 4 + 2 + 3


@needs_smol
def test_multiturn_record_on_smollm2_through_a_press(tmp_path):
    """attnbench method=streaming_llm_press task=multiturn model=smollm2_135m press.ratio=0.5
    press.setting=query_agnostic at 200 tokens, 2 turns: per-turn accuracy, the setting, the ratio,
    the measured bytes held (what the caches' tensors hold) below dense's."""
    import json

    from hydra import compose, initialize_config_dir

    from methods import CONF_DIR
    from runners import run

    store = tmp_path / "r.jsonl"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=smollm2_135m", "task=multiturn", "method=streaming_llm_press", "press.ratio=0.5",
            "press.setting=query_agnostic", f"store={store}", "device=cpu", "task.token_lengths=[200]", "task.trials=1",
            "task.needles=2", "runner.timing_len=64", "runner.warmup=0", "runner.repeats=1", "runner.cpu_threads=1"])
    run(cfg)
    (rec,) = [json.loads(x) for x in store.read_text().splitlines()]
    assert rec["status"] == "ok", rec["error"]
    m, d = rec["metrics"], rec["details"]
    assert rec["method_params"]["ratio"] == 0.5 and "press" not in rec["config"]
    assert d["setting"] == "query_agnostic" and d["press"]["setting"] == "query_agnostic"
    assert d["press"]["ratio"] == 0.5 and [la["kept_per_head"] for la in d["press"]["layers"]] == [100] * 30
    assert set(m) >= {"multiturn@200", "multiturn_turn1", "multiturn_turn2", "kv_bytes_held_prefill", "kv_bytes_dense"}
    assert m["multiturn@200"] == (m["multiturn_turn1"] + m["multiturn_turn2"]) / 2
    tokens = m["kv_bytes_dense"] / (30 * 2 * 3 * 64 * 4)  # dense: every token of the session, K and V, fp32
    assert m["kv_bytes_held_prefill"] == 30 * 2 * 3 * (100 + tokens - 200) * 64 * 4  # 100 kept + room for the turns
    assert m["kv_share_held"] < 0.8


# ---- the shorthand -------------------------------------------------------------------------------------
def test_press_shorthand_sets_the_ratio_and_the_setting(compose_cfg):
    cfg = with_press(compose_cfg("method=snapkv", "task=needle", "press.ratio=0.25", "press.setting=query_agnostic"))
    assert cfg.method.ratio == 0.25 and cfg.task.setting == "query_agnostic" and "press" not in cfg
    plain = compose_cfg("method=dense")
    assert "press" not in with_press(plain) and with_press(plain).method == plain.method


@pytest.mark.parametrize("overrides, match", [
    (["method=snapkv", "press.ratio=1.5"], r"press.ratio .* must be in \(0, 1\), got 1.5"),
    (["method=h2o", "press.ratio=0"], r"must be in \(0, 1\), got 0"),
    (["method=dense", "press.ratio=0.5"], "applies to a KV-cache press"),
    (["method=fastgen", "press.ratio=0.5"], "method.recovery"),
    (["method=snapkv", "press.setting=both"], "query_aware or query_agnostic"),
])
def test_bad_press_shorthand_is_refused_before_anything_runs(compose_cfg, overrides, match):
    with pytest.raises(ValueError, match=match):
        with_press(compose_cfg(*overrides))


def test_a_bad_method_ratio_fails_at_build(compose_cfg):
    import methods

    with pytest.raises(ValueError, match=r"ratio .* must be in \(0, 1\)"):
        methods.load("pyramidkv", ratio=1.0)


@pytest.mark.parametrize("method", ["snapkv", "razor_attention", "fastgen"])
def test_a_press_on_a_task_without_a_compressed_cache_is_refused_before_loading(method, tmp_path, monkeypatch):
    """task=perplexity scores a forward pass, which keeps no cache to compress: a press is refused
    before the model's weights load (the loader here fails if called) and no record is written;
    the same press on needle, ruler, multiturn and fidelity, and dense on perplexity, pass the check."""
    from hydra import compose, initialize_config_dir

    import models.pretrained
    from methods import CONF_DIR
    from runners import run
    from runners.pretrained import check_press_task

    def no_loading(*a, **k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(models.pretrained, "load", no_loading)
    store = tmp_path / "r.jsonl"

    def cfg(*o):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=["model=smollm2_135m", f"store={store}", "device=cpu", *o])

    with pytest.raises(ValueError, match=rf"method={method} is a KV-cache press: .* not task=perplexity"):
        run(cfg(f"method={method}", "task=perplexity"))
    assert not store.exists() or not store.read_text().strip()
    for task in ("needle", "ruler", "multiturn", "fidelity"):
        check_press_task(cfg(f"method={method}", f"task={task}"))
    check_press_task(cfg("method=dense", "task=perplexity"))


# ---- Eigen Attention in a rotary model -------------------------------------------------------------
def _low_rank_llama(path, rank_dims: int):
    """A tiny GQA Llama (head dim 8) whose k_proj and v_proj write each KV head's keys and values
    (before the rotary embedding) into its first ``rank_dims`` dimensions only."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.view(2, 8, 32)[:, rank_dims:] = 0
    model.save_pretrained(path)
    return str(path)


def test_eigen_attention_projects_the_keys_before_their_rotation(tmp_path):
    """Eigen Attention's RoPE path (official LlamaEigenAttention: the cache holds pre-rotary
    low-rank keys, projected back up and rotated at each attention). In a Llama whose keys and
    values lie in 4 of 8 dimensions before the rotation, rank 4 (ratio 0.5) from calibration
    text loses nothing: generation through the press (prefill, then decode steps under teacher
    forcing) equals the eager model's logits. A basis fitted to the keys after the rotation
    cannot: RoPE turns dimension i into i + 4 by position, so rotated keys fill all 8."""
    path = _low_rank_llama(tmp_path, 4)
    model = hf_decode.load(path, "eigen_attention", ratio=0.5)
    got_cal = hf_decode.calibrate(model, torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(5)))
    assert all(r["keys"] == "pre-rotary" and r["rank"] == 4 for r in got_cal.values())
    P, N = 40, 6
    ids = torch.randint(0, 64, (2, P), generator=torch.Generator().manual_seed(1))
    forced = torch.randint(0, 64, (2, N), generator=torch.Generator().manual_seed(2))
    got = hf_decode.generate(model, ids, N, forced=forced)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        want = ref(input_ids=torch.cat([ids, forced], 1)).logits
    for j, logits in enumerate(got.logits):
        torch.testing.assert_close(logits, want[:, P - 1 + j], rtol=1e-5, atol=1e-5)
    for s in got.stats:  # rank 4 of 8 per token and KV head, plus the two bases [Hkv, 8, 4] fp32
        assert s["keys"].startswith("pre-rotary") and s["bytes_held"] == 2 * 2 * 2 * (P + N) * 4 * 4 + 2 * 2 * 8 * 4 * 4


# ---- FastGen in a model: per-head kept tokens -------------------------------------------------------
_KEPT: dict = {}  # layer -> allowed prompt columns [B, Hkv, P] for the rows after the prompt


def _masked_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager causal attention of the whole sequence in which every row after the prompt sees,
    per KV head, only the prompt tokens ``_KEPT[layer]`` (and every later token)."""
    B, H, T, D = query.shape
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, key.shape[1], T, T).clone()
    kept = _KEPT[module.layer_idx]
    P = kept.shape[-1]
    allowed[:, :, P:, :P] &= kept[:, :, None, :]
    allowed = allowed.repeat_interleave(H // key.shape[1], 1)
    k, v = (x.repeat_interleave(H // key.shape[1], 1) for x in (key, value))
    s = (query @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2).contiguous(), None


@needs_smol
def test_fastgen_generation_equals_the_model_with_each_heads_evicted_tokens_masked(smol_path):
    """FastGen inside SmolLM2-135M (recovery 0.95 on 200 tokens of prose: its KV heads pick
    different policies, so each holds its own rows): prefill, then decode steps under teacher
    forcing; the logits equal the eager model's in which each layer's KV head, for every row
    after the prompt, sees only the prompt tokens its cache holds (read from the cache's
    positions) and the later tokens."""
    from transformers import AttentionInterface, AutoTokenizer
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("fastgen_reference", _masked_reference)
    AttentionMaskInterface.register("fastgen_reference", sdpa_mask)
    tok = AutoTokenizer.from_pretrained(smol_path)
    P, N = 200, 6
    text = torch.tensor([_prose(tok, P + N)])
    ids, forced = text[:, :P], text[:, P:]
    s = hf_decode.Session(hf_decode.load(smol_path, "fastgen", recovery=0.95), P + N,
                          classes=hf_decode.token_classes(tok))
    got = [s.prefill(ids)] + s.feed(forced[:, :-1])
    layers = s.cache.layers
    assert any(la.kv.rows is not None for la in layers)  # some heads keep fewer tokens than others
    for i, la in enumerate(layers):
        hp = la.kv.head_pos
        _KEPT[i] = (hp[:, :, :, None] == torch.arange(P)).any(2)
    assert not all(bool(k.all()) for k in _KEPT.values())  # something was evicted
    ref = transformers.AutoModelForCausalLM.from_pretrained(smol_path, attn_implementation="fastgen_reference").eval()
    with torch.no_grad():
        want = ref(input_ids=text).logits
    for j, logits in enumerate(got):
        torch.testing.assert_close(logits, want[:, P - 1 + j], rtol=1e-4, atol=1e-4)


@needs_smol
def test_multiturn_turns_on_one_cache_equal_each_turn_without_a_cache(smol_path):
    """The second turn on the cache (prefill the context, feed turn 1's question and gold answer,
    then turn 2's) predicts what one cache-free forward of the whole conversation so far
    predicts, at every answer position of both turns: through FastGen at recovery 1 (every head
    keeps every token) against the model without a press (tasks.multiturn's reference)."""
    tok = pretrained_tok(smol_path)
    trial = multiturn.make_trial(tok, _prose(tok, 1500, skip=0), 300, needles=3, turns=2, seed=1)
    from models.smollm2_135m import SmolLM2

    dense, pressed = SmolLM2(method=_cfg("dense")), SmolLM2(method=_cfg("fastgen", recovery=1.0))
    want = multiturn.answer_turns(dense.eval(), trial, "query_agnostic")
    got = multiturn.answer_turns(pressed.eval(), trial, "query_agnostic")
    assert not dense.pressed and pressed.pressed
    assert got == want and [len(p) for p in got] == [len(a) + 1 for a in trial["answers"]]
