"""Constants that more than one stage uses, each defined here once (no imports: any stage,
however light, can take them)."""

# Mean Earth radius (IUGG), the one haversine distances assume; metres.
EARTH_RADIUS_M = 6_371_008.8

# VIGOR's four cities, and how its cross-area protocol divides them (docs/DATA.md).
VIGOR_CITIES = ("Chicago", "NewYork", "SanFrancisco", "Seattle")
VIGOR_CROSS_AREA = {"train": ("NewYork", "Seattle"), "test": ("Chicago", "SanFrancisco")}

# The files of a run directory: `ssageo train` writes them; report, demo and eval read them.
CONFIG_FILE = "config.yaml"  # the resolved config (also beside every checkpoint's weights)
METRICS_FILE = "metrics.jsonl"  # one JSON record per step, validation and skipped step
SUMMARY_FILE = "summary.json"  # written when training ends
EVAL_FILE = "eval.json"  # held-out metrics of the final checkpoint (`ssageo demo`)
REPORT_FILE = "report.html"  # `ssageo report`'s default output
