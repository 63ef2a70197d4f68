"""Did keys shared between training and evaluation help this report's passkey numbers?

This report was produced with passkey recipe 4, whose training documents drew their keys from
random.Random(seed), the evaluation's stream: at seed 1234 about 39% of the evaluation's trials used
a key that was also in the training mix (recipe 5 draws them from a stream of their own). This script
rebuilds recipe 4's training keys and compares success on shared and other keys, within the same
(row, distance) cells of the evaluations that produced the report.

    python results/reproduction-cpu/shared_keys_check.py [WORK_DIR]   # default outputs/reproduce/cpu

It reads that run's work folder as it was: one evaluation folder per table (eval/extensions,
eval/inside_window, eval/ablation_long_passkey). reproduce.py now writes one per run
(eval/extensions_base, eval/extensions_pi, ...), and only recipe-4 runs have keys to compare.
"""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.datamodule import TextDataModule  # noqa: E402
from data.synthetic_passkey import PasskeyPrompter  # noqa: E402

WORK = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/reproduce/cpu")
tok = TextDataModule(seq_len=128, vocab_size=4096).tokenizer  # the CPU run's (the bundled corpus, 4096 pieces)


def old_training_keys(count, max_tokens, seed=1234):
    """The keys recipe 4 drew: random.Random(seed), key then distance then filler length."""
    prompter, rng, keys = PasskeyPrompter(tok), random.Random(seed), set()
    for _ in range(count):
        key = str(rng.randint(10000, 99999))
        answer = [*prompter.answer(key, end="."), tok.eos_id]
        longest = max_tokens - len(answer)
        smallest, largest = prompter.distance_range(longest, key)
        distance = rng.randint(smallest, largest)
        rng.randint(longest - (largest - distance), longest)
        keys.add(key)
    return keys


# Documents in the mixes (data.passkey_share=0.2): at most L = 128 tokens (base and fine-tunes), and at
# most L' = 1024 tokens (the long-passkey ablation's fine-tunes, which start from the base).
mixes = {"base": old_training_keys(3209, 128), "lpk": old_training_keys(479, 1024)}
for name, mix in [("extensions", "base"), ("inside_window", "base"), ("ablation_long_passkey", "lpk")]:
    r = json.loads((WORK / "eval" / name / "results.json").read_text())
    totals = {True: [0, 0], False: [0, 0]}
    cells_with_both = []
    train = mixes[mix] | (mixes["base"] if mix == "lpk" else set())  # lpk fine-tunes start from the base
    for row, p in r["passkey"].items():
        for keys, succ in zip(p["keys"], p["successes"]):
            flags = [k in train for k in keys]
            for f, s in zip(flags, succ):
                totals[f][0] += s; totals[f][1] += 1
            if any(flags) and not all(flags):
                sh = [s for f, s in zip(flags, succ) if f]; ot = [s for f, s in zip(flags, succ) if not f]
                cells_with_both.append((sum(sh) / len(sh), sum(ot) / len(ot), len(sh), len(ot)))
    n = len(cells_with_both)
    mean_sh = sum(c[0] for c in cells_with_both) / n; mean_ot = sum(c[1] for c in cells_with_both) / n
    print(f"{name}: shared keys {totals[True][1]} trials, success {totals[True][0] / max(1, totals[True][1]):.3f}; "
          f"other keys {totals[False][1]} trials, success {totals[False][0] / max(1, totals[False][1]):.3f}; "
          f"within {n} (row, distance) cells holding both: shared {mean_sh:.3f} vs other {mean_ot:.3f}")
