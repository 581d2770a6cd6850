"""Registry entries for the subject of the benchmark: QnA in its fast and its reference form."""
