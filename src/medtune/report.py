"""The evaluation report: one self-contained HTML page (plots inlined) a reviewer can open anywhere.

Sections: the plain-language headline (did the candidate beat the base model, CI excluding zero?), the
gate's decision rule by rule, the metric table for base / candidate / champion with paired bootstrap CIs,
the training loss curve, what the preference stage added (when it ran), a per-question-type breakdown, and the
questions where the candidate gained and lost most against the base model, side by side with the reference.
"""

from __future__ import annotations

import base64
import html
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from medtune import metric_catalog as catalog  # noqa: E402
from medtune import sweep  # noqa: E402
from medtune.metric_catalog import MODELS  # noqa: E402
from medtune.numeric import finite  # noqa: E402
# The per-question score the breakdown and the gained/lost lists use.
PER_QUESTION = {"free_text": ("rougeL", "token_f1"), "closed_form": ("correct",)}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _esc(value) -> str:
    return html.escape(str(value))


def fmt(value, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_ci(ci: dict | None) -> str:
    if not ci or ci.get("delta") is None:
        return "n/a"
    if ci.get("low") is None:
        return f"{fmt(ci['delta'], signed=True)} (no CI)"
    mark = " *" if ci.get("significant") else ""
    return f"{fmt(ci['delta'], signed=True)} [{fmt(ci['low'], signed=True)}, {fmt(ci['high'], signed=True)}]{mark}"


def loss_plot(history: list[dict]) -> str:
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return "<p>No training history was provided (evaluation of an existing adapter).</p>"
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Training loss")
    return _png(fig)


def preference_section(comparison: dict, decision: dict, history: list[dict]) -> str:
    """What the preference (DPO) stage added: held-out preference accuracy and reward margin per validation
    (step 0: the SFT policy), the candidate against its SFT-only result on every set, and the gate's decision
    on the SFT-only result."""
    evals = [h for h in history if "dpo_eval_rewards/margins" in h]
    if not evals and not comparison.get("sft"):
        return ""
    parts = ["<h2>Preference stage (DPO after SFT)</h2>"]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        steps = [h["step"] for h in evals]
        ax.plot(steps, [h["dpo_eval_rewards/margins"] for h in evals], "o-", label="reward margin")
        ax.plot(steps, [h["dpo_eval_rewards/accuracies"] for h in evals], "s-", label="preference accuracy")
        ax.set_xlabel("DPO step (0: the SFT policy)")
        ax.legend()
        ax.set_title("Held-out preference pairs")
        parts.append(_png(fig))
    rows = []
    for name, scored in {"test": comparison, **(comparison.get("suites") or {})}.items():
        vs_sft = (scored.get("ci") or {}).get("candidate_vs_sft") or {}
        rows += [[name, m, fmt(scored["sft"].get(m)), fmt((scored.get("candidate") or {}).get(m)),
                  fmt_ci(vs_sft.get(m))] for m in metric_names(scored) if scored.get("sft")]
    if rows:
        parts.append(_table(rows, ["set", "metric", "SFT only", "SFT + DPO (candidate)", "candidate - SFT only [CI]"]))
    if decision.get("sft_only"):
        verdict = "PASSED" if decision["sft_only"]["passed"] else "FAILED"
        parts.append(f"<p id=\"sft-only-gate\">The same gate on the SFT-only result: {verdict}. "
                     f"{_esc(decision['sft_only']['summary'])}</p>")
    return "\n".join(parts)


def _finite_or_zero(value) -> float:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def metric_plot(comparison: dict, names: tuple[str, ...]) -> str:
    """Left: each model's score. Right: candidate minus base / champion with the paired bootstrap CIs as
    error bars, which is what the gate decides on."""
    present = [m for m in MODELS if comparison.get(m)]
    fig, (ax, ax_delta) = plt.subplots(1, 2, figsize=(11, 3.4))
    width = 0.8 / max(len(present), 1)
    for k, model in enumerate(present):
        ax.bar([x + (k - (len(present) - 1) / 2) * width for x in range(len(names))],
               [_finite_or_zero(comparison[model].get(m)) for m in names], width, label=model)
    ax.set_xticks(list(range(len(names))), names)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"Test split, n={comparison['n']}")
    pairs = [p for p in ("candidate_vs_base", "candidate_vs_champion") if (comparison.get("ci") or {}).get(p)]
    width = 0.8 / max(len(pairs), 1)
    for k, pair in enumerate(pairs):
        intervals = [comparison["ci"][pair].get(m) or {} for m in names]
        deltas = [_finite_or_zero(ci.get("delta")) for ci in intervals]
        below = [max(d - _finite_or_zero(ci.get("low", d)), 0) for d, ci in zip(deltas, intervals)]
        above = [max(_finite_or_zero(ci.get("high", d)) - d, 0) for d, ci in zip(deltas, intervals)]
        ax_delta.bar([x + (k - (len(pairs) - 1) / 2) * width for x in range(len(names))], deltas, width,
                     yerr=[below, above], capsize=4, label=pair.replace("_vs_", " - "))
    ax_delta.axhline(0, color="black", linewidth=0.8)
    ax_delta.set_xticks(list(range(len(names))), names)
    if pairs:
        ax_delta.legend()
    confidence = (comparison.get("bootstrap") or {}).get("confidence", 0.95)
    ax_delta.set_title(f"Differences with {confidence:.0%} bootstrap CIs")
    fig.tight_layout()
    return _png(fig)


def _table(rows: list[list], header: list[str], raw: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if i in raw else _esc(c)}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def metric_names(comparison: dict) -> list[str]:
    kind = comparison.get("kind", "free_text")
    return [m for m in (*catalog.of_kind(kind), *catalog.of_kind("quality")) if m in (comparison.get("base") or {})]


def models_of(comparison: dict) -> list[str]:
    """The metric tables' model columns: base, candidate and champion always, the SFT-only result when scored."""
    return [m for m in MODELS if m != "sft" or comparison.get("sft") is not None]


def metric_table(comparison: dict) -> str:
    return _table(metric_rows(comparison), ["metric", "better", *models_of(comparison), "candidate - base [CI]",
                                            "candidate - champion [CI]"])


def metric_rows(comparison: dict) -> list[list[str]]:
    ci = comparison.get("ci") or {}
    vs_base, vs_champ = ci.get("candidate_vs_base") or {}, ci.get("candidate_vs_champion") or {}
    rows = []
    for m in metric_names(comparison):
        direction = {"none": "-"}.get(catalog.METRICS[m].direction, catalog.METRICS[m].direction)
        rows.append([m, direction, *[fmt((comparison.get(model) or {}).get(m)) if comparison.get(model) is not None
                                    else "—" for model in models_of(comparison)],
                     fmt_ci(vs_base.get(m)), fmt_ci(vs_champ.get(m))])
    return rows


def breakdown(predictions: pd.DataFrame, kind: str) -> tuple[list[str], list[list[str]]]:
    """Mean per-question score by question type, for every model scored."""
    scores = [s for s in PER_QUESTION.get(kind, ()) if f"base_{s}" in predictions]
    models = [m for m in MODELS if f"{m}_answer" in predictions]
    columns = [f"{m}_{s}" for s in scores for m in models]
    qtype = predictions["qtype"].fillna("(none)").astype(str) if "qtype" in predictions else \
        pd.Series(["(none)"] * len(predictions))
    grouped = predictions.assign(_qtype=qtype).groupby("_qtype")
    rows = []
    for name, group in grouped:
        rows.append([name, len(group), *[fmt(group[c].mean(), 3) for c in columns]])
    rows.sort(key=lambda r: -r[1])
    rows.append(["all", len(predictions), *[fmt(predictions[c].mean(), 3) for c in columns]])
    return ["question type", "n", *[c.replace("_", " ", 1) for c in columns]], rows


def swings(predictions: pd.DataFrame, kind: str, k: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The k questions where the candidate gained most and the k where it lost most against the base."""
    score = PER_QUESTION.get(kind, ("rougeL",))[0]
    if f"candidate_{score}" not in predictions or f"base_{score}" not in predictions:
        return predictions.head(0), predictions.head(0)
    frame = predictions.assign(gain=predictions[f"candidate_{score}"] - predictions[f"base_{score}"])
    gained = frame[frame["gain"] > 0].sort_values("gain", ascending=False, kind="stable").head(k)
    lost = frame[frame["gain"] < 0].sort_values("gain", ascending=True, kind="stable").head(k)
    return gained, lost


def _references(row) -> str:
    refs = row.references if isinstance(getattr(row, "references", None), list) else [row.answer]
    if len(refs) == 1:
        return _esc(refs[0])
    return "<ol>" + "".join(f"<li>{_esc(r)}</li>" for r in refs) + "</ol>"


def _swing_table(frame: pd.DataFrame, kind: str) -> str:
    if frame.empty:
        return "<p>None.</p>"
    score = PER_QUESTION.get(kind, ("rougeL",))[0]
    with_champion = "champion_answer" in frame
    header = ["question", "reference", "base", "candidate", *(["champion"] if with_champion else []),
              f"{score} gain"]
    rows = [[_esc(r.question), _references(r), _esc(r.base_answer), _esc(r.candidate_answer),
             *([_esc(r.champion_answer)] if with_champion else []), fmt(r.gain, 3, signed=True)]
            for r in frame.itertuples()]
    return _table(rows, header, raw=set(range(len(header))))


def length_flags(comparison: dict, fraction: float) -> list[str]:
    """Sets (own split and suites, free text) where the candidate's mean answer length moved by more than
    `fraction` of the base model's: overlap metrics can reward or punish length alone."""
    flags = []
    sets = {"test": comparison, **(comparison.get("suites") or {})}
    for name, scored in sets.items():
        base = finite((scored.get("base") or {}).get("answer_words_mean"))
        cand = finite((scored.get("candidate") or {}).get("answer_words_mean"))
        if base and cand is not None and abs(cand - base) / base > fraction:
            flags.append(f"{name}: candidate answers average {cand:.1f} words against the base model's {base:.1f} "
                         f"({(cand - base) / base:+.0%}, flagged beyond ±{fraction:.0%})")
    return flags


def suite_sections(comparison: dict) -> str:
    """One table per evaluation suite: base, candidate, champion and the paired CIs, plus the length ratio."""
    parts = []
    for name, scored in (comparison.get("suites") or {}).items():
        parts.append(f"<h3>{_esc(name)} ({_esc(scored.get('kind'))}, {_esc(scored.get('scoring'))}, "
                     f"n={scored.get('n')})</h3>")
        parts.append(metric_table(scored))
    return "".join(parts) or "<p>No evaluation suites in the profile (eval.suites).</p>"


def _trial_steps(trial: dict) -> str:
    screened = trial.get("screened")
    return f"{screened['at_step']} of {screened['of_steps']}" if screened else str(trial["metrics"].get("steps", ""))


def trials_section(trials: dict | None) -> str:
    """The sweep's trials (settings, status, selection metric, the winner marked) and a scatter plot of each
    setting against the metric; nothing for a run of one trial."""
    if not trials or len(trials["trials"]) < 2:
        return ""
    metric = trials["metric"]
    rows = [[t["index"], ", ".join(f"{k}={v}" for k, v in t["trial"].items()), t["status"],
             fmt(t["metrics"].get(metric)), _trial_steps(t), t.get("reason", ""),
             "winner" + sweep.finished(t, metric) if t["winner"] else ""] for t in trials["trials"]]
    settings = sorted({k for t in trials["trials"] for k in t["trial"]})
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.2), squeeze=False)
    for ax, key in zip(axes[0], settings):
        done = [(t["trial"][key], t["metrics"][metric], t["winner"]) for t in trials["trials"]
                if key in t["trial"] and metric in t["metrics"]]
        if done:
            xs, ys, won = zip(*done)
            ax.scatter(xs, ys, c=["tab:red" if w else "tab:blue" for w in won])
        if key.endswith("rate"):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    fig.suptitle(f"Trials: {metric} by setting (red: winner)")
    better = "lower" if trials["lower_is_better"] else "higher"
    return (f"<h2>Sweep: {len(rows)} trials, {better} {_esc(metric)} wins</h2>"
            f"{_table(rows, ['trial', 'settings', 'status', metric, 'steps', 'reason', ''])}{_png(fig)}")



def _decoding_note(decoding: dict) -> str:
    from medtune.config import DecodingConfig

    off = DecodingConfig().model_dump()
    added = ", ".join(f"{k}={v}" for k, v in decoding.items() if v != off.get(k))
    return (f"Answers are greedy{f' with {_esc(added)} on the answer' if added else ''} (the profile's "
            "<code>decoding</code>, as served); the champion answers with the decoding it was gated with.")


def _reuse_note(reused: dict | None) -> str:
    if not reused:
        return ""
    names = ", ".join(f"{_esc(model)} ({len(outputs)})" for model, outputs in reused.items())
    return (f" Outputs taken from an earlier run with the same weights, prompts, settings and code (medtune.reuse): "
            f"{names}.")


def render(comparison: dict, decision: dict, history: list[dict], predictions: pd.DataFrame, title: str,
           length_change_flag: float = 0.3, trials: dict | None = None) -> str:
    kind = comparison.get("kind", "free_text")
    flags = "".join(f"<li>{_esc(f)}</li>" for f in length_flags(comparison, length_change_flag))
    checks = [[c.get("suite", "test"), c["rule"], fmt(c["value"]), f"{c.get('op', '>=')} {c['bound']}", c.get("verdict") or
               ("PASS" if c["passed"] else "FAIL"), c.get("reason", "")] for c in decision.get("checks", [])]
    verdict = "PASSED" if decision["passed"] else "FAILED"
    promote = ("the new version becomes <b>champion</b>" if decision.get("promote") else
               "the new version becomes <b>challenger</b>; champion stays where it is (policy: promote is off)"
               ) if decision["passed"] else "nothing is registered, promoted or pushed"
    info = comparison.get("champion_info") or {}
    champion = (f"champion: {_esc(info.get('name'))} version {_esc(info.get('version'))} (MLflow alias "
                "<code>champion</code>)" if info.get("available") else
                f"champion: none ({_esc(info.get('reason') or 'not looked up')})")
    headline = "".join(f"<li>{_esc(s)}</li>" for s in decision.get("headline") or [])
    boot = comparison.get("bootstrap") or {}
    ci_note = (f"Differences are candidate minus the other model, with a {fmt(boot.get('confidence', 0.95), 2)} "
               f"paired bootstrap percentile CI ({boot.get('samples')} resamples of the same questions, seed "
               f"{boot.get('seed')}); * marks a CI that excludes zero. Perplexity is on the "
               f"{_esc(comparison.get('perplexity_split') or 'test')} split's reference answers. "
               f"{_decoding_note(comparison.get('decoding') or {})}{_reuse_note(comparison.get('reused_outputs'))}")
    names = catalog.PRIMARY.get(kind, ())
    plot_names = tuple(m for m in (*names, "rouge1", "rouge2", "exact_match") if m in (comparison.get("base") or {})
                       and m != "bleu")
    # A failed gate leads with why: the rules come before the headline numbers.
    gate_first = (f"""<h2>Gate: {verdict}</h2><p id="gate-summary">{_esc(decision['summary'])}</p><p>{promote}.</p>"""
                  f"<p>{champion}</p>{_table(checks, ['set', 'rule', 'value', 'bound', 'verdict', 'note'])}")
    headline_section = f'<h2>Headline</h2><ul id="headline">{headline}</ul>'
    b_header, b_rows = breakdown(predictions, kind)
    gained, lost = swings(predictions, kind)
    score = PER_QUESTION.get(kind, ("rougeL",))[0]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{_esc(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:90%}}</style></head><body>
<h1>{_esc(title)}</h1>
{gate_first if not decision["passed"] else headline_section}
{headline_section if not decision["passed"] else gate_first}
<h2>Answer length</h2><ul id="length-flags">{flags or "<li>No set's mean answer length changed by more than "
                                           f"{length_change_flag:.0%}.</li>"}</ul>
<h2>Metrics (test split, n={comparison['n']} questions, {comparison.get('n_references', comparison['n'])} references)</h2>
<p>{ci_note}</p>
{metric_table(comparison)}
{metric_plot(comparison, plot_names) if plot_names else ""}
<h2>Evaluation suites</h2><div id="suites">{suite_sections(comparison)}</div>
<h2>Training</h2>{loss_plot(history)}
{preference_section(comparison, decision, history)}
{trials_section(trials)}
<h2>By question type (mean per-question score)</h2>
{_table(b_rows, b_header)}
<h2>Largest gains over the base model ({score})</h2>
{_swing_table(gained, kind)}
<h2>Largest losses against the base model ({score})</h2>
{_swing_table(lost, kind)}
</body></html>"""
