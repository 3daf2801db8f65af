"""
--decode: greedy generation, cached and uncached, one row per model, untrained at the given
dims. A variant may ask for several rows (decode_settings: MoD at four capacities, its routers
set to route that share of the tokens); when the transformers package imports, its
GPT2LMHeadModel.generate at the same dims is a row too (else the line says why not).
"""

import time

import torch

from benchmarks.profiling import print_profiles
from benchmarks.timing import interleaved, median_and_spread, median_seconds, sync, warn_if_noisy
from benchmarks.timing import write_csv
from benchmarks.training import build
from configurator import import_optional
from variants import VARIANTS


def time_decode(model, cfg, device, use_cache, prompt=None):
    """(tokens/s, KV-cache bytes of the first context window) for greedy generation of
    max_new_tokens; past block_size, generate() restarts its cache, so that window is the peak."""
    if prompt is None:
        prompt = torch.zeros((cfg.decode_batch, 1), dtype=torch.long)
    prompt = prompt.to(device)
    model.generate(prompt, 4, temperature=0, use_cache=use_cache)  # warmup
    best = float("inf")
    for _ in range(cfg.decode_repeats):  # the fastest run: the least disturbed by the machine
        cache = model.new_cache() if use_cache else None
        sync(device)
        t0 = time.perf_counter()
        model.generate(prompt, cfg.max_new_tokens, temperature=0, use_cache=use_cache, cache=cache)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    kv_bytes = model.kv_cache_nbytes(cache) if use_cache else 0
    return cfg.decode_batch * cfg.max_new_tokens / best, kv_bytes


def hf_generate(config, device):
    """(transformers' GPT2LMHeadModel.generate at the same dims, None), or (None, why not)."""
    classes, why_not = import_optional("transformers", "GPT2Config", "GPT2LMHeadModel")
    if classes is None:
        return None, why_not
    GPT2Config, GPT2LMHeadModel = classes
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size,
                                    n_embd=config.n_embd, n_layer=config.n_layer,
                                    n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, bos_token_id=None,
                                    eos_token_id=None)).to(device).eval()  # never stops early

    def generate(prompt, n, use_cache):
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=0)

    return generate, None


def decode_models(cfg, settings, config, device):
    """{row name: untrained model} for every variant and each setting it asks to be timed at."""
    models = {}
    for name, vs in settings.items():
        for label, row_settings in VARIANTS[name][0].decode_settings(vs).items():
            model = build(name, row_settings, config, cfg.seed).to(device)
            models[name + label] = model.calibrate_untrained(cfg.seed).eval()
    return models


def generators(cfg, models, config, device):
    """({row name: generate(prompt, n, use_cache)}, {row name: KV bytes after one generation},
    why transformers has no row, or None)."""
    runs, kv = {}, {}
    for name, model in models.items():
        cache = model.new_cache()
        prompt = torch.zeros((cfg.decode_batch, 1), dtype=torch.long, device=device)
        model.generate(prompt, cfg.max_new_tokens, temperature=0, cache=cache)
        kv[name] = model.kv_cache_nbytes(cache)
        runs[name] = lambda prompt, n, use_cache, model=model: model.generate(
            prompt, n, temperature=0, use_cache=use_cache)
    hf, hf_missing = hf_generate(config, device)
    if hf is not None:
        runs["transformers GPT-2"] = hf
    return runs, kv, hf_missing


@torch.no_grad()
def bench_decode(cfg, settings, config, device):
    """Greedy generation, cached and uncached, one row per model; ratios to the first."""
    models = decode_models(cfg, settings, config, device)
    generate, kv, hf_missing = generators(cfg, models, config, device)
    prompt = torch.zeros((cfg.decode_batch, 1), dtype=torch.long, device=device)
    runs = {}
    for name, gen in generate.items():
        gen(prompt, 4, True)  # warmup
        for use_cache in (True, False):
            runs[name, use_cache] = lambda gen=gen, use_cache=use_cache: median_seconds(
                lambda: gen(prompt, cfg.max_new_tokens, use_cache), 1, device)
    seconds = {key: median_and_spread(r) for key, r in interleaved(runs, cfg.repeats).items()}
    print(f"# greedy decode of {cfg.max_new_tokens} tokens, batch {cfg.decode_batch}, median of "
          f"{cfg.repeats} interleaved rounds; MoD routers set to route C of the tokens")
    print(f"{'variant':<20}{'cached tok/s':>13}{'uncached tok/s':>15}{'speedup':>9}"
          f"{'vs baseline':>12}{'KV bytes':>12}{'KV vs base':>11}{'spread':>8}")
    rows = []
    for name in generate:
        rows.append(decode_row(cfg, name, seconds, kv, base=rows[0] if rows else None))
        print_decode_row(rows[-1], rows[0], name in kv)
    if hf_missing:
        print(f"# no row for transformers' GPT-2 generate: {hf_missing}")
    warn_if_noisy({row["variant"]: row["spread"] for row in rows})
    write_csv(cfg.csv, rows)
    if cfg.profile:
        print_profiles({name: lambda g=g: g(prompt, cfg.max_new_tokens, True)
                        for name, g in generate.items()}, per=("token", cfg.max_new_tokens))


def decode_row(cfg, name, seconds, kv, base):
    """One CSV row; base: the first row (None for the first itself)."""
    tokens = cfg.decode_batch * cfg.max_new_tokens
    (cached, spread_c), (uncached, spread_u) = seconds[name, True], seconds[name, False]
    row = dict(variant=name, cached_tok_s=tokens / cached, uncached_tok_s=tokens / uncached,
               kv_bytes=kv.get(name, ""), spread=max(spread_c, spread_u))
    row["cached_vs_baseline"] = row["cached_tok_s"] / (base or row)["cached_tok_s"]
    return row


def print_decode_row(row, base, has_kv):
    kv_text = (f"{row['kv_bytes']:>12,}{row['kv_bytes'] / base['kv_bytes']:>10.2f}x" if has_kv
               else f"{'-':>12}{'-':>11}")
    print(f"{row['variant']:<20}{row['cached_tok_s']:>13,.0f}{row['uncached_tok_s']:>15,.0f}"
          f"{row['cached_tok_s'] / row['uncached_tok_s']:>8.2f}x"
          f"{row['cached_vs_baseline']:>11.2f}x{kv_text}{row['spread']:>8.0%}")
