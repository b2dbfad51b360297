"""What is asked of a model: probe files and prompts (`probes`), the facts attribution studies (`facts`), the out-of-
domain control probes (`control`)."""
