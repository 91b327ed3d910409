"""The paper's claims, stated and decided on a replication's results.

Each `claims_*` function takes what `tuning.replicate` saved for one figure
and returns one dict per claim: `{"claim": text, "result": "PASS" | "FAIL"
| "UNDECIDED" | "NOT RUN", "detail": the numbers behind it}`. A figure whose
data could not be had returns NOT RUN with the reason. Costs compare at the
final epoch; a diverged run counts as an infinite cost, worse than any
finite one. Where every run a claim compares diverged, the numbers decide
nothing: the claim is UNDECIDED (never PASS), and in a grid's tally such
points are not counted.
"""

import math

# "Similar", "as fast as", "equal or better": within this relative margin.
SIMILAR = 0.05
# "By far", "much faster": lower by at least this fraction.
BY_FAR = 0.20


def _final(panel_result, name):
    curve = panel_result["curves"].get(name) or {}
    return curve["loss"][-1] if curve.get("loss") else math.inf


def _claim(text, passed, detail, *compared):
    """PASS or FAIL; UNDECIDED if every cost in `compared` diverged."""
    if compared and all(math.isinf(c) for c in compared):
        return {"claim": text, "result": "UNDECIDED",
                "detail": f"every run compared diverged: {detail}"}
    return {"claim": text, "result": "PASS" if passed else "FAIL",
            "detail": detail}


def undecided_at(claim, scale):
    """`claim` at a `scale` too small to decide it: a PASS or FAIL becomes
    UNDECIDED, saying what it would have been."""
    if claim["result"] not in ("PASS", "FAIL"):
        return claim
    return {**claim, "result": "UNDECIDED",
            "detail": f"scale {scale} cannot decide it (would read "
                      f"{claim['result']}; run --scale quick or full): "
                      f"{claim['detail']}"}


def _both_diverged(a, b):
    return math.isinf(a) and math.isinf(b)


def _not_run(text, reason):
    return {"claim": text, "result": "NOT RUN", "detail": reason}


def _all_not_run(result, texts):
    return [_not_run(t, short(result["not_run"])) for t in texts]


def _vs(a, b, name_a, name_b):
    return f"{name_a} {a:.4g} vs {name_b} {b:.4g}"


def claims_figure1(left, right):
    """The claims of Section 6.1, decided on the final training cost."""
    out = []
    texts = [
        "Fig. 1 left (MNIST): Adam converges like SGDNesterov (final cost "
        f"within {SIMILAR:.0%})",
        "Fig. 1 left (MNIST): Adam's final cost <= AdaGrad's",
        "Fig. 1 left (MNIST): SGDNesterov's final cost <= AdaGrad's",
    ]
    if "not_run" in left:
        out += _all_not_run(left, texts)
    else:
        adam, sgd, ada = (_final(left, k)
                          for k in ("adam", "sgd_nesterov", "adagrad"))
        out += [
            _claim(texts[0], _close(adam, sgd),
                   _vs(adam, sgd, "Adam", "SGDNesterov"), adam, sgd),
            _claim(texts[1], adam <= ada, _vs(adam, ada, "Adam", "AdaGrad"),
                   adam, ada),
            _claim(texts[2], sgd <= ada,
                   _vs(sgd, ada, "SGDNesterov", "AdaGrad"), sgd, ada),
        ]
    texts = [
        "Fig. 1 right (IMDB): AdaGrad beats SGDNesterov by far (final cost "
        f"at least {BY_FAR:.0%} lower)",
        "Fig. 1 right (IMDB): Adam converges as fast as AdaGrad (final cost "
        f"<= AdaGrad's + {SIMILAR:.0%})",
    ]
    if "not_run" in right:
        out += _all_not_run(right, texts)
    else:
        adam, sgd, ada = (_final(right, k)
                          for k in ("adam", "sgd_nesterov", "adagrad"))
        out += [
            _claim(texts[0], ada <= (1 - BY_FAR) * sgd,
                   _vs(ada, sgd, "AdaGrad", "SGDNesterov"), ada, sgd),
            _claim(texts[1], adam <= (1 + SIMILAR) * ada,
                   _vs(adam, ada, "Adam", "AdaGrad"), adam, ada),
        ]
    return out


def claims_figure2(mlp):
    """Section 6.2: Adam is best (final cost lowest, within the margin)."""
    text = (f"Fig. 2 (MNIST MLP + dropout): Adam's final cost is the lowest "
            f"(or within {SIMILAR:.0%} of the lowest)")
    if "not_run" in mlp:
        return [_not_run(text, short(mlp["not_run"]))]
    finals = {c["label"]: _final(mlp, k) for k, c in mlp["curves"].items()}
    best = min(finals.values())
    detail = ", ".join(f"{k} {v:.4g}" for k, v in finals.items())
    return [_claim(text, finals["Adam"] <= (1 + SIMILAR) * best, detail,
                   *finals.values())]


def claims_figure3(cnn):
    """Section 6.3: early Adam and AdaGrad fastest; then Adam, SGD win."""
    texts = [
        "Fig. 3 (CIFAR-10 CNN): after the first epoch, Adam's and AdaGrad's "
        "costs are below SGDNesterov's (with and without dropout)",
        "Fig. 3 (CIFAR-10 CNN): at the end, Adam's and SGDNesterov's costs "
        f"are at least {BY_FAR:.0%} below AdaGrad's (with and without "
        "dropout)",
    ]
    if "not_run" in cnn:
        return _all_not_run(cnn, texts)
    early, late, ok_early, ok_late = [], [], True, True
    undecided_early = undecided_late = False
    for suffix in ("", "_dropout"):
        first = {k: (cnn["curves"][k + suffix]["loss"] or [math.inf])[0]
                 for k in ("adam", "adagrad", "sgd_nesterov")}
        last = {k: _final(cnn, k + suffix)
                for k in ("adam", "adagrad", "sgd_nesterov")}
        tag = suffix.strip("_") or "no dropout"
        early.append(f"{tag}: Adam {first['adam']:.4g}, AdaGrad "
                     f"{first['adagrad']:.4g}, SGDNesterov "
                     f"{first['sgd_nesterov']:.4g}")
        late.append(f"{tag}: Adam {last['adam']:.4g}, SGDNesterov "
                    f"{last['sgd_nesterov']:.4g}, AdaGrad "
                    f"{last['adagrad']:.4g}")
        ok_early &= max(first["adam"], first["adagrad"]) < first[
            "sgd_nesterov"]
        undecided_early |= _both_diverged(
            max(first["adam"], first["adagrad"]), first["sgd_nesterov"])
        undecided_late |= _both_diverged(
            max(last["adam"], last["sgd_nesterov"]), last["adagrad"])
        ok_late &= max(last["adam"], last["sgd_nesterov"]) <= (
            1 - BY_FAR) * last["adagrad"]
    # Where one dropout setting's runs compared all diverged, it decides
    # nothing, so the claim (about both settings) is undecided.
    return [_claim(texts[0], ok_early, "; ".join(early),
                   *([math.inf] if undecided_early else [])),
            _claim(texts[1], ok_late, "; ".join(late),
                   *([math.inf] if undecided_late else []))]


def _close(a, b):
    return abs(a - b) <= SIMILAR * min(a, b)


def short(reason):
    """The first sentence of a dataset error: what is missing."""
    return reason.split(" Without a network")[0][:240]



def _grid(result, corrected, checkpoint):
    return {(r["beta_1"], r["beta_2"], r["log10_alpha"]): r[checkpoint]
            for r in result["runs"] if r["bias_correction"] == corrected}


def claims_figure4(result):
    """Section 6.4's claims on the grid; diverged runs count as infinite."""
    texts = [
        "Fig. 4 (VAE): with bias correction the loss is equal or better "
        f"(within {SIMILAR:.0%}) than without, at every grid point, both "
        "epochs",
        "Fig. 4 (VAE): without correction, beta_2 = 0.9999 is unstable: for "
        f"each beta_1, at some alpha it diverges or is more than {SIMILAR:.0%}"
        " worse than with correction (early epoch)",
        "Fig. 4 (VAE): such points are at least as many early as late, and "
        "at beta_2 = 0.9999 as at 0.99 (counts)",
        "Fig. 4 (VAE): beta_1 = 0.9, beta_2 = 0.9999, alpha = 1e-3, early "
        "epoch: corrected loss < uncorrected",
        "Fig. 4 (VAE): at its best alpha, corrected is equal or better "
        f"(within {SIMILAR:.0%}) than uncorrected at its best alpha, for "
        "every beta_1, beta_2, both epochs",
    ]
    if "not_run" in result:
        return _all_not_run(result, texts)
    out = []
    worse, total, both = [], 0, 0
    bad = {}  # (checkpoint, beta_2) -> points where uncorrected is bad
    for checkpoint in ("early", "late"):
        on, off = _grid(result, True, checkpoint), _grid(result, False,
                                                         checkpoint)
        for point, value in on.items():
            if _both_diverged(value, off[point]):
                both += 1  # decides nothing: not counted
                continue
            total += 1
            if not _not_worse(value, off[point]):
                worse.append(f"{checkpoint} b1={point[0]} b2={point[1]} "
                             f"a=1e{point[2]}: {value:.4g} vs "
                             f"{off[point]:.4g}")
            if not _not_worse(off[point], value):
                bad.setdefault((checkpoint, point[1]), set()).add(point)
    uncounted = (f"; {both} points where both diverged not counted"
                 if both else "")
    out.append(_claim(
        texts[0], not worse,
        f"{total - len(worse)}/{total} points hold"
        + (f"; exceptions: {'; '.join(worse[:6])}"
           + (" ..." if len(worse) > 6 else "") if worse else "")
        + uncounted, *([math.inf] if not total else []),
    ))
    beta_2s = sorted({r["beta_2"] for r in result["runs"]})
    beta_1s = sorted({r["beta_1"] for r in result["runs"]})
    high, low = max(beta_2s), min(beta_2s)
    early_high = bad.get(("early", high), set())
    per_beta_1 = {b1: sum(1 for p in early_high if p[0] == b1)
                  for b1 in beta_1s}
    on, off = _grid(result, True, "early"), _grid(result, False, "early")
    decided_high = [p for p in on if p[1] == high
                    and not _both_diverged(on[p], off[p])]
    out.append(_claim(
        texts[1], all(per_beta_1.values()),
        "points where uncorrected diverges or is worse, per beta_1: "
        + ", ".join(f"beta_1={k}: {v}" for k, v in per_beta_1.items())
        + uncounted, *([math.inf] if not decided_high else []),
    ))
    counts = {f"{c} b2={b2}": len(bad.get((c, b2), ()))
              for c in ("early", "late") for b2 in (low, high)}
    out.append(_claim(
        texts[2],
        counts[f"early b2={high}"] >= counts[f"late b2={high}"]
        and counts[f"early b2={high}"] >= counts[f"early b2={low}"]
        and counts[f"early b2={high}"] > 0,
        ", ".join(f"{k}: {v}" for k, v in counts.items()) + uncounted,
        *([math.inf] if not total else []),
    ))
    key = (0.9, high, -3)
    on, off = _grid(result, True, "early"), _grid(result, False, "early")
    if high != 0.9999 or key not in on:
        out.append(_not_run(texts[3], "point not in this scale's grid"))
    else:
        out.append(_claim(texts[3], on[key] < off[key],
                          f"corrected {on[key]:.4g} vs uncorrected "
                          f"{off[key]:.4g} (public reproduction, 10 epochs: "
                          "106.3 vs 129.8)", on[key], off[key]))
    best, lost = [], []
    for checkpoint in ("early", "late"):
        on, off = _grid(result, True, checkpoint), _grid(result, False,
                                                         checkpoint)
        for beta_1 in beta_1s:
            for beta_2 in beta_2s:
                a = min(v for p, v in on.items() if p[:2] == (beta_1, beta_2))
                b = min(v for p, v in off.items()
                        if p[:2] == (beta_1, beta_2))
                if _both_diverged(a, b):
                    continue  # decides nothing: not counted
                best.append(f"{checkpoint} b1={beta_1} b2={beta_2}: "
                            f"{a:.4g} vs {b:.4g}")
                if not _not_worse(a, b):
                    lost.append(best[-1])
    out.append(_claim(texts[4], not lost,
                      f"{len(best) - len(lost)}/{len(best)} hold"
                      + (f"; exceptions: {'; '.join(lost)}" if lost
                         else f"; e.g. {best[-1]}" if best else ""),
                      *([math.inf] if not best else [])))
    return out


def _not_worse(a, b):
    """a <= b within the margin (a diverged run, inf, is worse than any
    finite one; callers leave out points where both diverged)."""
    return a <= b + SIMILAR * abs(b)



def claims_amsgrad(result):
    """Adam drifts to x near +1; AMSGrad goes below 0 (optimum -1)."""
    adam, ams = result["adam"]["x"][-1], result["amsgrad"]["x"][-1]
    return [
        _claim("AMSGrad counterexample: Adam ends near +1 (x_T >= 0.9), "
               "the worst point", adam >= 0.9, f"x_T = {adam:.4f}"),
        _claim("AMSGrad counterexample: AdamPlus(amsgrad=True) ends below 0 "
               "(toward the optimum -1)", ams < 0, f"x_T = {ams:.4f}"),
    ]
