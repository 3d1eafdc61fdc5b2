"""The MLflow tags medtune sets on runs and registered model versions: every name in one place."""

# Identity of a run and of the model versions it registers (tracking.identity)
VERSION = "medtune.version"  # medtune's package version
GIT_SHA = "medtune.git_sha"  # the code's commit ("-dirty" when uncommitted changes ran)
CONFIG_SHA256 = "medtune.config_sha256"  # the resolved run-time config
BASE_MODEL = "medtune.base_model"
BASE_MODEL_REVISION = "medtune.base_model_revision"
RUNNER = "medtune.runner"  # "kubernetes" (task pods) or "kfp.local"

# The parent run
PIPELINE_RUN = "medtune.pipeline_run"
KFP_RUN_ID = "medtune.kfp_run_id"
REQUESTED_BY = "medtune.requested_by"
GATE = "medtune.gate"  # "passed" / "failed" (also on the version)
GATE_SUMMARY = "medtune.gate_summary"
MODEL_VERSION = "medtune.model_version"  # "<name>/<version>" registered by this run
LINEAGE_SHA256 = "medtune.lineage_sha256"  # the audit record (also on the version)
BASE_MODEL_COMMIT = "medtune.base_model_commit"  # the exact base weights: Hub commit ...
BASE_MODEL_SHA256 = "medtune.base_model_sha256"  # ... or a local directory's content hash

# A step's nested run
STEP = "medtune.step"
IMAGE = "medtune.image"  # the container image the step's pod ran (absent under kfp.local)
TRIAL = "medtune.trial"  # train: the sweep trial's index
TRIAL_STATUS = "medtune.trial_status"  # train: a trial that did not finish: stopped or failed
TRIAL_REASON = "medtune.trial_reason"
CHAMPION = "medtune.champion"  # evaluate: "<name>/<version>" compared against, or "none"
PAIRS_PREFIX = "medtune.pairs."  # preference: "<prefix><split>.sha256", the fingerprint of its pairs

# A registered model version
RUN_ID = "medtune.run_id"  # the parent run that registered it
PROMOTED = "medtune.promoted"
PREVIOUS_CHAMPION = "medtune.previous_champion"
HUB_REPO = "medtune.hub_repo"
HUB_COMMIT = "medtune.hub_commit"
DECODING = "medtune.decoding"  # JSON of the decoding it was gated with, and is served with
IMAGES = "medtune.images"  # JSON {step: image} of the run's pods (absent under kfp.local)
