"""One pipeline for every stage: recipes (`recipe.py`), what a stage sees while planning (`context.py`), the run
(`run.py`: check → plan each stage → export → verify), the export (`export.py`) and chained verification
(`verify.py`)."""
