"""The evaluation report: one self-contained HTML page (plots inlined) a reviewer can open anywhere."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from medtune.metrics import METRICS  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def loss_plot(history: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Training loss")
    return _png(fig)


def metric_plot(comparison: dict) -> str:
    names = [m for m in METRICS if m != "bleu"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.38
    xs = range(len(names))
    ax.bar([x - width / 2 for x in xs], [comparison["base"][m] for m in names], width, label="base")
    ax.bar([x + width / 2 for x in xs], [comparison["candidate"][m] for m in names], width, label="candidate")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"Test split, n={comparison['n']} (BLEU in the table)")
    return _png(fig)


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(comparison: dict, decision: dict, history: list[dict], predictions: pd.DataFrame,
           title: str) -> str:
    metric_rows = [[m, f"{comparison['base'][m]:.4f}", f"{comparison['candidate'][m]:.4f}",
                    f"{comparison['delta'][m]:+.4f}"] for m in METRICS]
    gate_rows = [[c["rule"], "n/a" if c["value"] is None else f"{c['value']:.4f}", c["bound"],
                  "PASS" if c["passed"] else "FAIL", c["reason"]] for c in decision["checks"]]
    swings = predictions.assign(gain=predictions["candidate_rougeL"] - predictions["base_rougeL"])
    top = pd.concat([swings.nlargest(5, "gain"), swings.nsmallest(5, "gain")]).drop_duplicates("id")
    example_rows = [[r.question, r.answer, r.base_answer, r.candidate_answer, f"{r.gain:+.3f}"]
                    for r in top.itertuples()]
    verdict = "PASSED" if decision["passed"] else "FAILED"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:90%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Gate: {verdict}</h2><p>{html.escape(decision['summary'])}</p>
{_table(gate_rows, ["rule", "value", "bound", "verdict", "note"])}
<h2>Metrics (test split, n={comparison['n']})</h2>
{_table(metric_rows, ["metric", "base", "candidate", "candidate - base"])}
{metric_plot(comparison)}
<h2>Training</h2>{loss_plot(history)}
<h2>Largest gains and losses (ROUGE-L)</h2>
{_table(example_rows, ["question", "reference", "base", "candidate", "ROUGE-L gain"])}
</body></html>"""
