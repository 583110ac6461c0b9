"""Using the scores: queries and selections, the HTML report and its charts, labels, metrics, evaluation."""
