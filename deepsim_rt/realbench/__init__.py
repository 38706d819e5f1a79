"""The real-brain benchmark (`deepsim-rt evaluate-real`): every method, ours and ANTs, on the real brains of
deepsim_rt.data.real_brains, scored with one Dice / NCC / folding code (deepsim_rt.evaluate.real_metrics).

  runner.PAIRS, runner.METHODS, runner.run_benchmark(out, grid, pairs, methods)  per pair-method JSON, resumable
  report.write_report(out, path)                                                 markdown tables + figures
  cli.add_subcommands(subparsers)                                                `deepsim-rt evaluate-real`
"""
