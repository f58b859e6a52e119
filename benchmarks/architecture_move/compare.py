"""Compares a vla-eval run's episodes with the ones recorded before the architecture steps (per_episode.json):
`python benchmarks/architecture_move/compare.py OUTPUT_DIR sync|realtime` -> how many of the 50 differ in task,
seed, success, length or policy calls."""

import json
import sys
from pathlib import Path

RECORDED = Path(__file__).with_name("per_episode.json")
output_dir, mode = sys.argv[1], sys.argv[2]
recorded = json.loads(RECORDED.read_text())[{"sync": 0, "realtime": 1}[mode]]["per_episode"]
run = [json.loads(line) for line in (Path(output_dir) / "episodes.jsonl").read_text().splitlines()]
mine = {(r["task"], r["seed"]): {"task": r["task"], "seed": r["seed"], "success": r["success"], "length": r["length"],
                                 "policy_calls": len(r["inference_latency_s"])} for r in run}
differ = [row for row in recorded if mine.get((row["task"], row["seed"])) != row]
print(f"{len(mine)} episodes, success {sum(r['success'] for r in mine.values()) / len(mine):.1%}; "
      f"differ from before: {len(differ)}")
for row in differ[:5]:
    print("before", row, "after", mine.get((row["task"], row["seed"])))
