from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Output

from medtune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def validate_data(config: str, run_id: str, data: Output[Dataset], quarantine: Output[Dataset],
                  validation: Output[Artifact], data_docs: Output[HTML]):
    """Ingest the configured source and run the Great Expectations suite; stop on a blocking failure.

    `data_docs` is the suite's GX Data Docs page for this run (also logged to MLflow); `quarantine` holds
    every rejected row with its source file, line and the rule it failed.
    """
    from medtune import steps

    summary = steps.validate_data(config, run_id, data.path, quarantine.path, validation.path, data_docs.path)
    data.metadata.update(rows=summary["rows_kept"])
    quarantine.metadata.update(rows=summary["rows_quarantined"], by_rule=summary["quarantined_by_rule"])
    validation.metadata.update(rows_read=summary["rows_read"], kept_fraction=summary["kept_fraction"])
