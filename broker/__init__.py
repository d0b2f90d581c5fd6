"""Identity federation broker: provider token in, scoped short-lived AWS credentials out."""
