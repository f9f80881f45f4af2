"""The built-in layer handlers (one per layer type, registered on import): nn.Linear, nn.Conv1d /
2d / 3d, Hugging Face GPT-2 Conv1D, nn.MultiheadAttention, nn.GRU / nn.LSTM."""

from tensorslim.handlers.conv import ConvHandler
from tensorslim.handlers.hf_conv1d import HFConv1DHandler
from tensorslim.handlers.linear import LinearHandler
from tensorslim.handlers.mha import MHAHandler
from tensorslim.handlers.rnn import RNNHandler

__all__ = ["ConvHandler", "HFConv1DHandler", "LinearHandler", "MHAHandler", "RNNHandler"]
