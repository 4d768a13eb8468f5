"""Training machinery shared by train.py and eval_extrapolate.py."""
