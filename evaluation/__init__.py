"""Evaluation harness: long-context probes against a running QAdA server, policy sweeps, head
calibration (oracle shares, retrieval scores, key statistics), plots and a results report."""
