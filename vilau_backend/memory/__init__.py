"""Where the weights live and in what form (int8/4-bit weight quantization, layer placement across
devices), and the working memory a run needs beyond them."""
