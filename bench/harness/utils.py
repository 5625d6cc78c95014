"""lm-evaluation-harness helpers for twitter_complaints.yaml: the tweet's column, renamed so that the prompt template
can name it ("Tweet text" has a space)."""


def process_docs(dataset):
    return dataset.rename_column("Tweet text", "tweet")
