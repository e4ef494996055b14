"""The benchmark results file: RESULTS_DIR/<bench>-<device slug>-<date>.json holding
{"device", "date", "command", "metrics"} (and any extra keys), written to a temporary name and
renamed when complete."""
import datetime
import json
import os


def write(results_dir, bench, device, command, metrics, **extra):
    date = datetime.date.today().isoformat()
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{bench}-{device.lower().replace(' ', '-')}-{date}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"device": device, "date": date, "command": command, "metrics": metrics,
                   **extra}, f, indent=2)
    os.replace(path + ".tmp", path)
    return path
