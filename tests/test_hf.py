"""lk.hf: linearising transformers GPT-2 / Llama-family models (tiny config-built models, random
weights, no network). Skipped without the [hf] extra, except the import-isolation tests."""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import leapformer_kernels as lk


def test_import_does_not_import_transformers():
    code = "import sys, leapformer_kernels as lk; assert 'transformers' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_missing_extra_is_one_line():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ModuleNotFoundError("No module named 'transformers'")
        sys.meta_path.insert(0, Block())
        import leapformer_kernels as lk
        try:
            lk.hf
        except ImportError as e:
            print("ERR", e)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("ERR")]
    assert line and "[hf]" in line[0] and "transformers" in line[0], (out.stdout, out.stderr[-2000:])


try:  # the tests below need the [hf] extra; the two above run without it
    import transformers
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
except ImportError:
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason='needs the [hf] extra (pip install -e ".[hf]")')

V = 97


def gpt2(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=layers, n_head=4, n_positions=128, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def llama(seed=0, layers=2):  # GQA: 4 query heads, 2 kv heads
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def qwen2(seed=0, layers=2):  # q/k/v biases, MQA
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).eval()


def mistral(seed=0, layers=2):  # a sliding window shorter than the prompt: LeaP layers attend to all of it
    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=4,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return MistralForCausalLM(cfg).eval()


MODELS = {"gpt2": gpt2, "llama": llama, "qwen2": qwen2, "mistral": mistral}


def attn_modules(model):
    base = model.base_model
    return [b.attn for b in base.h] if hasattr(base, "h") else [b.self_attn for b in base.layers]


def randomize_leap(model):  # non-trivial proportions (the default init already is; make it wider)
    with torch.no_grad():
        for p in lk.hf.leap_parameters(model):
            p.normal_(0, 0.5)


def reference_attention(m, x, pos_emb, pad=None):
    """The linearised layer recomputed from its pretrained projections with lk.reference (float64)."""
    B, T, _ = x.shape
    if hasattr(m, "c_attn"):
        q, k, v = m.c_attn(x).split(m.split_size, dim=2)
    else:
        q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    hd = m.head_dim
    q = q.view(B, T, -1, hd) * hd ** -0.5
    k, v = k.view(B, T, -1, hd), v.view(B, T, -1, hd)
    pq, pk = m.leap_q(torch.relu(q)), m.leap_k(torch.relu(k))
    if pos_emb is not None:  # transformers' own RoPE, in its [B, H, T, D] layout
        qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *pos_emb)
        q, k = qr.transpose(1, 2), kr.transpose(1, 2)
    o = lk.reference.leap_attention(q.double(), k.double(), v.double(), pq.double(), pk.double(), causal=True,
                                    key_padding_mask=pad, eps=0.1)
    o = o.to(x.dtype).reshape(B, T, -1)
    return m.c_proj(o) if hasattr(m, "c_proj") else m.o_proj(o)


def capture(modules):
    seen = {}

    def hook(i):
        def f(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            seen[i] = (x.detach(), kwargs.get("position_embeddings"), out[0].detach())
        return f
    handles = [mod.register_forward_hook(hook(i), with_kwargs=True) for i, mod in enumerate(modules)]
    return seen, handles


@needs_hf
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "mistral"])
def test_forward_equals_reference(name):
    model = MODELS[name]()
    ref = copy.deepcopy(model)
    assert lk.hf.linearize(model) is model
    randomize_leap(model)
    mods = attn_modules(model)
    assert all(isinstance(m, lk.hf.LeapSelfAttention) for m in mods)
    # the pretrained projections are reused: same values, same parameter names
    ref_sd = ref.state_dict()
    for key, val in model.state_dict().items():
        if ".leap_q." not in key and ".leap_k." not in key:
            assert torch.equal(val, ref_sd[key]), key
    assert set(ref_sd) <= set(model.state_dict())
    ids = torch.randint(1, V, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding in row 1
    seen, handles = capture(mods)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    assert logits.shape == (2, 11, V) and logits.dtype == torch.float32
    with torch.no_grad():
        for i, m in enumerate(mods):
            x, pos_emb, out = seen[i]
            want = reference_attention(m, x, pos_emb, pad=mask == 0)
            assert (pos_emb is None) == (name == "gpt2")
            torch.testing.assert_close(out[0], want[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out[1, 3:], want[1, 3:], atol=1e-5, rtol=1e-4)  # real rows of row 1


@needs_hf
def test_layers_subset_keeps_other_layers():
    model = llama(layers=3)
    ref = copy.deepcopy(model)
    lk.hf.linearize(model, layers=[-1, 1])
    kinds = [type(m).__name__ for m in attn_modules(model)]
    assert kinds == ["LlamaAttention", "LeapSelfAttention", "LeapSelfAttention"]
    assert model.config.leapformer["layers"] == [1, 2]
    ids = torch.randint(1, V, (2, 9))
    with torch.no_grad():
        a = model(ids, output_hidden_states=True).hidden_states
        b = ref(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)  # layer 0 untouched
    assert not torch.allclose(a[2], b[2])
    lk.hf.linearize(model, layers=[0])  # later: more layers
    assert model.config.leapformer["layers"] == [0, 1, 2]


@needs_hf
@pytest.mark.parametrize("name,layers", [("gpt2", None), ("llama", None), ("llama", [0]), ("qwen2", [1])])
def test_generate_with_state_equals_recomputation(name, layers):
    model = lk.hf.linearize(MODELS[name](), layers=layers)
    randomize_leap(model)
    ids = torch.randint(1, V, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left-padded prompts
    mask[2, :4] = 0
    ids[mask == 0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
              output_scores=True, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        again = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, again.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(again.scores), atol=1e-4, rtol=1e-4)
    cache = getattr(cached, "cache", None) or getattr(cached, "past_key_values")
    leap = [c for c in cache.layers if isinstance(c, lk.hf.LeapCacheLayer)]
    expect = 2 if layers is None else len(layers)
    assert len(leap) == expect
    mod = [m for m in attn_modules(model) if isinstance(m, lk.hf.LeapSelfAttention)][0]
    for c in leap:  # O(1): (S, z) only, sized by heads and head_dim, not by the context
        S, z = c.state
        assert S.shape == (3, mod.num_heads, 2 * mod.head_dim, mod.head_dim) and z.shape == S.shape[:3]
        assert c.get_seq_length() == 6 + 12 - 1
    # a left-padded row generates what it generates alone (padding never enters the state)
    with torch.no_grad():
        alone = model.generate(ids[2:, 4:], **{**kw, "attention_mask": mask[2:, 4:]}, use_cache=True)
    assert torch.equal(alone.sequences[0, 2:], cached.sequences[2, 6:])


@needs_hf
def test_save_load_round_trip(tmp_path):
    model = lk.hf.linearize(llama(layers=3), layers=[0, 2], leap_hidden=3)
    randomize_leap(model)
    model.save_pretrained(tmp_path)
    back = lk.hf.load(tmp_path)
    assert [type(m).__name__ for m in attn_modules(back)] == ["LeapSelfAttention", "LlamaAttention",
                                                               "LeapSelfAttention"]
    assert back.config.leapformer == model.config.leapformer
    assert attn_modules(back)[0].leap_q.hidden == 3
    ids = torch.randint(1, V, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)
    # stock from_pretrained is what load must not be: it rebuilds softmax attention
    stock = type(model).from_pretrained(tmp_path)
    assert not any(isinstance(m, lk.hf.LeapSelfAttention) for m in attn_modules(stock))


@needs_hf
def test_gpt2_save_load_and_dtype(tmp_path):
    model = lk.hf.linearize(gpt2(), attention="linear").to(torch.float64)
    assert lk.hf.leap_parameters(model) == []
    ids = torch.randint(1, V, (1, 8))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.float64
    model.save_pretrained(tmp_path)
    back = lk.hf.load(tmp_path, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, logits, atol=0, rtol=0)


@needs_hf
def test_peft_lora_and_leap_training():
    peft = pytest.importorskip("peft")
    model = lk.hf.linearize(llama())
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for p in lk.hf.leap_parameters(model):
        p.requires_grad_(True)
    ids = torch.randint(1, V, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert any("lora_A" in n for n in trained) and any(".leap_q." in n for n in trained)
    assert not any("embed_tokens" in n for n in trained)


@needs_hf
def test_bad_input_named():
    with pytest.raises(ValueError, match="PreTrainedModel"):
        lk.hf.linearize(torch.nn.Linear(2, 2))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="unsupported architecture BertModel"):
        lk.hf.linearize(bert)
    model = llama()
    with pytest.raises(ValueError, match=r"layers \[5\] are not layer indices .* 2 layers"):
        lk.hf.linearize(model, layers=[0, 5])
    with pytest.raises(ValueError, match="layers"):
        lk.hf.linearize(model, layers=["0"])
    with pytest.raises(ValueError, match="attention must be one of"):
        lk.hf.linearize(model, attention="cosformer")
    assert not any(isinstance(m, lk.hf.LeapSelfAttention) for m in attn_modules(model))  # nothing half-done
    lk.hf.linearize(model, layers=[0])
    with pytest.raises(ValueError, match=r"layers \[0\] are already linearised"):
        lk.hf.linearize(model, layers=[0, 1])
    with pytest.raises(ValueError, match="2D attention_mask"):
        model(torch.randint(1, V, (1, 4)), attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))


@needs_hf
def test_load_of_plain_model_is_named(tmp_path):
    llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no linearised model"):
        lk.hf.load(tmp_path)
    with pytest.raises(ValueError, match="folder written by save_pretrained"):
        lk.hf.load(tmp_path / "nope")


@needs_hf
def test_readme_example_runs(tmp_path):
    """The README's lk.hf example (a ```py block: the README snippet test runs without the extra)."""
    from pathlib import Path
    import re
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Linearising a Hugging Face model", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```py\n(.*?)```", section, re.S)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "linearised" / "config.json").is_file()


@needs_hf
def test_beam_search_and_bfloat16():
    model = lk.hf.linearize(llama())
    randomize_leap(model)
    ids = torch.randint(1, V, (2, 5))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0)
    with torch.no_grad():  # reorder_cache on the (S, z) states
        assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 5, V) and torch.isfinite(logits).all()
