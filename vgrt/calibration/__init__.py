"""Calibration: the UNet inputs of real method runs, captured to disk, and INT8 UNets quantised from them.

- `dataset`: a calibration set on disk (one safetensors shard per captured run, a manifest listing them);
- `capture`: runs methods with a recording wrapper around the UNet runner and adds their feeds to a set;
- `int8`: CPU INT8 exports of a UNet (ONNX Runtime's static Q/DQ, which both CPU backends run) calibrated
  on a set; `vgrt compose --precision int8 --calibrated DIR` runs one;
- `tensorrt_qdq`: TensorRT INT8 and FP8 exports: symmetric Q/DQ nodes in vgrt's own fp16 export;
- `sensitivity`: per-layer signal-to-quantisation-noise ratios, and the layers that fall back to float.
- `smoothquant`: SmoothQuant for the layers below the SQNR threshold, tried before they fall back to float.
- `attention_qdq`: the attentions without a mask in int8 (Q/DQ on q, k, v and the softmax probabilities).
"""

# Defaults of a capture: the budget for one method on SD 1.5 in under 30 minutes on 2 cores.
DEFAULT_SEEDS = (0, 1)
DEFAULT_STEPS = 10
DEFAULT_MAX_SAMPLES = 128  # 2 seeds x 10 steps of a method with inversion is 40 calls: room for several methods
# A layer below this falls back to float: 30 dB is quantisation noise at 3% of the layer's input RMS.
# Min/max INT8 puts most layers at 35-45 dB; the few below 30 hold outliers (conv_in on raw latents, some
# projections), as the layers demoDiffusion leaves out by name. Measured on tiny (random weights, 4 steps,
# 2 seeds; UNet error on held-out feeds, final latents' error against fp32, the bf16 floor in brackets):
#   threshold   VCF: float layers, UNet, latents (bf16 0.023)   MCA-Ctrl: float layers, UNet, latents (bf16 0.139)
#   30 dB       4 of 119, 0.030, 0.14                            3 of 119, 0.106, 0.55
#   35 dB       19, 0.028, 0.11                                  12, 0.084, 0.56
#   40 dB       53, 0.005, 0.032                                 50, 0.010, 0.063
# 40 dB is within the bf16 floor on tiny but keeps nearly every Conv in float, which is where SD 1.5's
# CPU time goes (42%); 30 dB keeps the speed. Read the report of `vgrt calibrate` on real weights and
# raise --sqnr-threshold where INT8 lands further from fp32 than bf16.
DEFAULT_SQNR_THRESHOLD_DB = 30.0
# E4M3 keeps 3 mantissa bits: rounding alone costs about 29 dB SQNR per input whatever the scale (INT8's
# noise instead grows with a tensor's outliers), and every FP8 layer of tiny measures 28.5-28.7 dB, so
# INT8's 30 dB would send them all back to float. Below 20 dB a layer has values in E4M3's subnormals.
DEFAULT_FP8_SQNR_THRESHOLD_DB = 20.0
# Whether the CPU INT8 UNet runs its attentions without a mask in int8 (vgrt.calibration.attention_qdq).
# On SD 1.5 (LocRef, random weights, b2 64x64, OpenVINO, 2 threads) it took the INT8 UNet from 0.43 to 0.34
# of PyTorch fp32's time (0.78x) with the held-out UNet error unchanged (0.0994 against 0.0996) and the same
# error against PyTorch (0.17). The tiny preset (head size 8) gains nothing from it, and loses nothing.
DEFAULT_INT8_ATTENTION = True
