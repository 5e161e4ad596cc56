"""The README's result tables are the committed results, rendered: a rerun that moves a number must rewrite both."""
import json
from pathlib import Path

import eval as ev

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_are_rendered_from_results_json():
    readme = (ROOT / "README.md").read_text()
    for name in ("setting_a", "setting_b", "setting_c_text", "setting_c_infill", "setting_c_encode",
                 "setting_c_base_pooling", "setting_c_ablations_text", "setting_c_ablations_infill",
                 "setting_c_ablations_encode", *(p.stem for p in (ROOT / "results").glob("setting_c_seed*.json")),
                 *(p.stem for p in (ROOT / "results").glob("setting_c_warmup*.json"))):
        report = json.loads((ROOT / "results" / f"{name}.json").read_text())
        assert report["provenance"]["commit"], f"results/{name}.json does not record the commit that produced it"
        assert ev.markdown(report["results"]) in readme, f"README's table differs from results/{name}.json"
