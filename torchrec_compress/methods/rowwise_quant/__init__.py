"""Row-wise quantization: fbgemm's int8 / int4 / int2 rows (TorchRec's quantized collection), or fp16."""
