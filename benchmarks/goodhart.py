"""Goodhart's law on the offline world: PPO with the default KL penalty and with none, side by side.

    python benchmarks/goodhart.py                 # runs ppo.py twice (~22 min on 2 CPU cores), then reports
    python benchmarks/goodhart.py --no_run        # only the table and plot, from runs already made

Both runs evaluate every --eval_every steps on held-out prompts (ppo.py's curve.jsonl). The reward
model's score (rm_score, the proxy) and the gold rater's (gold_score, the truth) are printed against the
KL to the SFT policy as a markdown table, and drawn to an SVG plot (plain text: no plotting package).
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    total_episodes: int = 6144
    """episodes per run"""
    eval_every: int = 16
    """steps between evaluations"""
    num_eval_prompts: int = 512
    """held-out prompts of the final evaluation"""
    num_periodic_eval_prompts: int = 128
    """held-out prompts of the evaluations every eval_every steps"""
    kl_coef: float = 0.05
    """the KL-penalised run's coefficient (the other has 0)"""
    output_dir: str = "runs/goodhart"
    """where the two runs and goodhart.svg go"""
    run: bool = True
    """run ppo.py (otherwise only read the curves)"""


def svg_plot(curves, path, keys=("rm_score", "gold_score"), names=None, y_label="mean score", width=640, height=360,
             pad=50):  # fmt: skip
    """Scores against KL: one panel, a line per (run, key); `names` labels a key otherwise named "rm score", ...."""
    points = [(c["kl_to_ref"], c[k]) for rows in curves.values() for c in rows for k in keys]
    x0, x1 = min(0.0, min(p[0] for p in points)), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)

    def sx(x):
        return pad + (x - x0) / (x1 - x0 or 1) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0 or 1) * (height - 2 * pad)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
        f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">KL(policy || SFT), nats per response</text>',
        f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">{y_label}</text>',
    ]
    for v in (x0, (x0 + x1) / 2, x1):
        out.append(f'<text x="{sx(v)}" y="{height - pad + 15}" text-anchor="middle">{v:.1f}</text>')
    for v in (y0, (y0 + y1) / 2, y1):
        out.append(f'<text x="{pad - 5}" y="{sy(v) + 4}" text-anchor="end">{v:.2f}</text>')
    colors = dict(zip(keys, ("#1f77b4", "#d62728", "#2ca02c", "#9467bd"), strict=False))
    for i, (name, rows) in enumerate(curves.items()):
        dash = "" if i == 0 else ' stroke-dasharray="6 4"'
        for key, color in colors.items():
            pts = " ".join(f"{sx(c['kl_to_ref']):.1f},{sy(c[key]):.1f}" for c in rows)
            out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
            label_y = pad + 16 * (2 * i + list(colors).index(key))
            out.append(
                f'<line x1="{width - 250}" y1="{label_y - 4}" x2="{width - 220}" y2="{label_y - 4}" '
                f'stroke="{color}" stroke-width="2"{dash}/>'
            )
            label = (names or {}).get(key, key.replace("_score", "") + " score")
            out.append(f'<text x="{width - 215}" y="{label_y}">{label}, {name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    runs = {f"kl_coef {args.kl_coef}": args.kl_coef, "kl_coef 0": 0.0}
    curves = {}
    for name, kl in runs.items():
        out = os.path.join(args.output_dir, name.replace(" ", "_"))
        if args.run:
            command = (
                f"ppo.py --kl_coef {kl} --output_dir {out} --total_episodes {args.total_episodes} "
                f"--eval_every {args.eval_every} --num_eval_prompts {args.num_eval_prompts} "
                f"--num_periodic_eval_prompts {args.num_periodic_eval_prompts}"
            )
            subprocess.run([sys.executable, *command.split()], cwd=ROOT, check=True)
        with open(os.path.join(out, "curve.jsonl")) as f:
            curves[name] = [json.loads(line) for line in f]
    print("| run | episodes | kl_to_ref | rm_score | gold_score | gold_win_rate_vs_ref | distinct_2 | eos_rate |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in curves.items():
        for c in rows:
            print(
                f"| {name} | {c['episodes']} | {c['kl_to_ref']:.2f} | {c['rm_score']:.2f} | {c['gold_score']:.3f} | "
                f"{c['gold_win_rate_vs_ref']:.2f} | {c['distinct_2']:.2f} | {c['eos_rate']:.2f} |"
            )
    svg_plot(curves, os.path.join(args.output_dir, "goodhart.svg"))
    print(f"wrote {os.path.join(args.output_dir, 'goodhart.svg')}")
