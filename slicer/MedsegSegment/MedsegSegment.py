"""3D Slicer module: segment a volume with medseg, which runs in its own Python environment.

medseg runs as a plain subprocess (medseg_slicer_logic.MedsegJob, output to log files) that a
qt.QTimer polls every 200 ms on the main thread: the UI stays live, no thread touches Qt, and
running/cancel/timeout/errors are the same code that is tested without Slicer.
"""

import logging
import os
import sys
import time

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import medseg_slicer_logic as msl  # noqa: E402

SETTING_EXECUTABLE = "MedsegSegment/executable"


class MedsegSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Medseg Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["medseg developers"]
        self.parent.helpText = (
            "Segments the selected volume (one volume per sequence for models of several) with the medseg "
            "command line, run in its own Python environment, and loads the result as a segmentation with "
            "named, coloured segments. The model list holds medseg's bundled models and the ones installed by "
            "'medseg import-model' (nnU-Net, MONAI bundles). Without medseg, 'Set up medseg' under Advanced "
            f"installs it; or point the module at an existing one ({msl.ENV_VAR} or the 'medseg program' "
            "field). See slicer/README.md in the medseg repository.")
        self.parent.acknowledgementText = "Uses medseg (MONAI and PyTorch) as an external program."


class MedsegSegmentWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.job = None
        self.run = None  # (work folder, input node) of the running job
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = MedsegSegmentLogic()
        form = qt.QFormLayout()
        self.layout.addLayout(form)

        self.modelCombo = qt.QComboBox()
        self.modelCombo.editable = True
        self.modelCombo.addItem(msl.DEFAULT_MODEL)
        self.modelCombo.setToolTip("A model medseg knows (bundled, or installed by 'medseg import-model', e.g. an "
                                   "nnU-Net or MONAI bundle model), or the path of a .pt model.")
        form.addRow("Model:", self.modelCombo)
        self.models = []  # medseg models --json
        # one volume per sequence the chosen model takes; the first row is the input volume
        self.sequenceSelectors, self.sequenceLabels = [], []
        for i in range(1, 5):
            sel = slicer.qMRMLNodeComboBox()
            sel.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            sel.selectNodeUponCreation = False
            sel.addEnabled = sel.removeEnabled = False
            sel.noneEnabled = True
            sel.setMRMLScene(slicer.mrmlScene)
            sel.setToolTip("Volume of this sequence, co-registered with the first; the result lies on the model's "
                           "reference sequence's grid.")
            label = qt.QLabel(f"Sequence {i}:")
            form.addRow(label, sel)
            self.sequenceSelectors.append(sel)
            self.sequenceLabels.append(label)
        first = self.sequenceSelectors[0]  # the input volume (the first sequence of a model of several)
        first.selectNodeUponCreation, first.noneEnabled = True, False
        first.setToolTip("Volume to segment.")
        self._showSequences(["image"])
        self.deviceCombo = qt.QComboBox()
        self.deviceCombo.addItems(list(msl.DEVICES))
        form.addRow("Device:", self.deviceCombo)

        advanced = ctk.ctkCollapsibleButton()
        advanced.text = "Advanced"
        advanced.collapsed = True
        advForm = qt.QFormLayout(advanced)
        self.executableEdit = qt.QLineEdit(qt.QSettings().value(SETTING_EXECUTABLE, "") or "")
        self.executableEdit.setPlaceholderText(f"empty: ${msl.ENV_VAR}, then medseg on PATH, then usual venvs")
        self.executableEdit.setToolTip("medseg program, e.g. /path/to/medseg/.venv/bin/medseg or "
                                       "'/path/to/python -m medseg'. Saved in Slicer's settings.")
        advForm.addRow("medseg program:", self.executableEdit)
        self.checkButton = qt.QPushButton("Check medseg")
        advForm.addRow(self.checkButton)
        self.setupButton = qt.QPushButton("Set up medseg")
        self.setupButton.setToolTip(f"Install medseg into its own Python environment ({msl.setup_dir()}), without "
                                    "touching Slicer's Python; takes a few minutes and a download of PyTorch.")
        advForm.addRow(self.setupButton)
        self.timeoutSpin = qt.QSpinBox()
        self.timeoutSpin.setRange(0, 24 * 60)
        self.timeoutSpin.value, self.timeoutSpin.suffix = 60, " min"
        self.timeoutSpin.setToolTip("Stop medseg after this long (0: no limit).")
        advForm.addRow("Timeout:", self.timeoutSpin)
        self.keepCheck = qt.QCheckBox("Keep temporary folder (input, output, logs)")
        advForm.addRow(self.keepCheck)
        self.layout.addWidget(advanced)

        buttons = qt.QHBoxLayout()
        self.applyButton, self.cancelButton = qt.QPushButton("Apply"), qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        buttons.addWidget(self.applyButton)
        buttons.addWidget(self.cancelButton)
        self.layout.addLayout(buttons)
        self.statusLabel = qt.QLabel("Idle")
        self.statusLabel.wordWrap = True
        self.layout.addWidget(self.statusLabel)
        self.logView = qt.QPlainTextEdit()  # medseg's output, live
        self.logView.readOnly = True
        self.logView.setMaximumBlockCount(2000)
        self.layout.addWidget(self.logView)

        self.applyButton.connect("clicked(bool)", self.onApply)
        self.cancelButton.connect("clicked(bool)", self.onCancel)
        self.checkButton.connect("clicked(bool)", self.onCheck)
        self.setupButton.connect("clicked(bool)", self.onSetup)
        self.modelCombo.connect("currentIndexChanged(int)", self.onModelChanged)
        self.refreshModels(quiet=True)

    def cleanup(self):
        self.timer.stop()
        if self.job is not None and not self.job.finished:
            self.job.cancel()
            msl.cleanup_work_dir(self.run[0])

    def _setRunning(self, running):
        self.applyButton.enabled = not running
        self.cancelButton.enabled = running

    def _showSequences(self, names):
        """One volume row per sequence of the chosen model (a model of one image: the input volume only)."""
        for i, (label, sel) in enumerate(zip(self.sequenceLabels, self.sequenceSelectors)):
            visible = i < len(names)
            label.visible = sel.visible = visible
            if visible:
                label.text = "Input volume:" if names == ["image"] else f"{names[i]} volume:"
        self.sequenceNames = list(names)

    def refreshModels(self, quiet=False):
        """Fill the model list from 'medseg models --json' (bundled and installed models)."""
        try:
            cmd = self.logic.findExecutable(self.executableEdit.text)
            self.models = msl.list_models(cmd, env=self.logic.environment())
        except msl.MedsegNotFound as exc:
            if not quiet:
                slicer.util.errorDisplay(str(exc), windowTitle="medseg")
            return
        current = self.modelCombo.currentText
        self.modelCombo.blockSignals(True)
        self.modelCombo.clear()
        for m in self.models:
            self.modelCombo.addItem(m["name"])
            tip = (f"{m.get('kind', '')} model ({m.get('source', 'medseg')}): inputs {', '.join(m.get('inputs') or [])}; "
                   f"outputs {', '.join(m.get('outputs') or [])}")
            self.modelCombo.setItemData(self.modelCombo.count - 1, tip, qt.Qt.ToolTipRole)
        self.modelCombo.blockSignals(False)
        index = self.modelCombo.findText(current)
        self.modelCombo.setCurrentIndex(index if index >= 0 else max(self.modelCombo.findText(msl.DEFAULT_MODEL), 0))
        self.onModelChanged()

    def onModelChanged(self, index=None):
        self._showSequences(msl.model_inputs(self.models, self.modelCombo.currentText.strip()))

    def onCheck(self):
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            cmd = self.logic.findExecutable(self.executableEdit.text)
            msl.check_medseg(cmd, timeout=60, env=self.logic.environment())
            formats = msl.predict_supports_format(cmd, timeout=60, env=self.logic.environment())
            self.statusLabel.text = f"medseg works: {' '.join(cmd)}" + ("" if formats else " (no --format: too old)")
            self.refreshModels()
        except msl.MedsegNotFound as exc:
            slicer.util.errorDisplay(str(exc) + " 'Set up medseg' under Advanced installs it.", windowTitle="medseg")
        finally:
            qt.QApplication.restoreOverrideCursor()

    def onSetup(self):
        if not slicer.util.confirmOkCancelDisplay(
                f"Install medseg into {msl.setup_dir()}? This downloads medseg's dependencies (PyTorch, MONAI, about "
                "1 GB) and takes a few minutes; Slicer's own Python is not changed.", windowTitle="medseg"):
            return
        try:
            python = msl.find_python(env=self.logic.environment())
            work = msl.make_work_dir("medseg-setup-")
            self.job = msl.MedsegJob(msl.setup_command(python), None, log_dir=work, timeout=3600,
                                     env=self.logic.environment())
        except (RuntimeError, OSError) as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="medseg")
            return
        self.run = (work, None)
        self.logView.setPlainText(" ".join(self.job.command[:2]) + " ... (setting up medseg)")
        self.statusLabel.text = "Setting up medseg..."
        self._setRunning(True)
        self.timer.start()

    def onApply(self):
        node = self.sequenceSelectors[0].currentNode()
        if node is None:
            slicer.util.errorDisplay("Select an input volume first.")
            return
        qt.QSettings().setValue(SETTING_EXECUTABLE, self.executableEdit.text.strip())
        try:
            names = self.sequenceNames
            nodes = [sel.currentNode() for sel in self.sequenceSelectors[:len(names)]]
            if any(n is None for n in nodes):
                raise ValueError(f"choose one volume for each of the {len(names)} sequences: {', '.join(names)}")
            sequences = dict(zip(names, nodes)) if len(names) > 1 else None
            self.job, work = self.logic.start(node, self.modelCombo.currentText, self.deviceCombo.currentText,
                                              self.executableEdit.text, self.timeoutSpin.value * 60 or None,
                                              sequences=sequences)
        except (RuntimeError, ValueError, OSError) as exc:  # MedsegNotFound is a RuntimeError
            slicer.util.errorDisplay(str(exc), windowTitle="medseg")
            return
        self.run = (work, node)
        self.logView.setPlainText(" ".join(self.job.command))
        self.statusLabel.text = "Running medseg..."
        self._setRunning(True)
        self.timer.start()

    def onCancel(self):
        if self.job is not None and not self.job.finished:
            self.statusLabel.text = "Cancelling..."
            self.job.cancel()

    def onPoll(self):
        try:
            for line in self.job.poll():
                self.logView.appendPlainText(line)
        except Exception:  # never leave a timer raising every 200 ms
            self.timer.stop()
            self._setRunning(False)
            raise
        elapsed = self.job.result.elapsed if self.job.finished else time.monotonic() - self.job.start_time
        self.statusLabel.text = f"Running medseg... {elapsed:.0f} s"
        if self.job.finished:
            self.timer.stop()
            self._setRunning(False)
            self.onFinished(self.job.result)

    def onFinished(self, result):
        work, node = self.run
        if node is None:  # the setup job
            self.onSetupFinished(result, work)
            return
        try:
            if result.success and result.output_path is None:  # several sequences: medseg named the output
                result.output_path = msl.find_output(os.path.join(str(work), "output"))
                if result.output_path is None:
                    result.success, result.error = False, "medseg finished but wrote no segmentation"
            if result.success:
                seg = self.logic.loadResult(result.output_path, node)
                info = msl.describe_segments(result.output_path)
                self.statusLabel.text = f"Done in {result.elapsed:.1f} s: {seg.GetName()}" + (f" ({info})" if info else "")
            elif result.cancelled:
                self.statusLabel.text = "Cancelled."
            else:
                self.statusLabel.text = f"Failed: {result.error}"
                slicer.util.errorDisplay(f"medseg failed: {result.error}", windowTitle="medseg",
                                         detailedText="\n".join(result.lines[-100:]))
        except Exception as exc:  # loading the result: report, never leave the UI stuck
            logging.exception("medseg result could not be loaded")
            slicer.util.errorDisplay(f"Could not load {result.output_path}: {exc}", windowTitle="medseg")
        finally:
            kept = not msl.cleanup_work_dir(work, keep=self.keepCheck.checked)
            if kept and os.path.isdir(work):
                self.logView.appendPlainText(f"temporary folder kept: {work}")


    def onSetupFinished(self, result, work):
        exe = msl.venv_executable(msl.setup_dir())
        if result.success and exe.is_file():
            self.executableEdit.text = str(exe)
            qt.QSettings().setValue(SETTING_EXECUTABLE, str(exe))
            self.statusLabel.text = f"medseg is set up: {exe}"
            self.refreshModels()
        else:
            self.statusLabel.text = f"Setting up medseg failed: {result.error or 'see the log'}"
            slicer.util.errorDisplay(f"Setting up medseg failed: {result.error}", windowTitle="medseg",
                                     detailedText="\n".join(result.lines[-100:]))
        msl.cleanup_work_dir(work, keep=self.keepCheck.checked)


class MedsegSegmentLogic(ScriptedLoadableModuleLogic):
    """The Slicer-side steps: export the volume, start medseg, load its segmentation."""

    def environment(self):
        # the environment Slicer was started with, not the launcher's (PYTHONHOME, library paths)
        env = slicer.util.startupEnvironment() if hasattr(slicer.util, "startupEnvironment") else os.environ
        return msl.clean_environment(env)

    def findExecutable(self, setting=""):
        return msl.find_medseg(setting, env=self.environment())

    def exportVolume(self, node, work):
        """Write ``node`` as NIfTI into ``work/input`` without retargeting its storage node."""
        path = os.path.join(str(work), "input", msl.safe_name(node.GetName()) + ".nii.gz")
        storage = node.GetStorageNode()
        previous = storage.GetFileName() if storage else None
        ok = slicer.util.saveNode(node, path)
        if storage is not None and previous:
            storage.SetFileName(previous)
        if not ok or not os.path.isfile(path):
            raise RuntimeError(f"Slicer could not write {node.GetName()} to {path}")
        return path

    def start(self, node, model, device, setting="", timeout=None, fmt="seg.nrrd", sequences=None):
        """Export ``node`` (or every volume of ``sequences``, ``{name: node}``) and start medseg on it; returns
        (MedsegJob, work folder). With several sequences the job's output path is found when it ends."""
        cmd = self.findExecutable(setting)
        work = msl.make_work_dir()
        try:
            out_dir = os.path.join(str(work), "output")
            if sequences:
                files = {name: self.exportVolume(seq_node, work) for name, seq_node in sequences.items()}
                command = msl.build_command(cmd, None, out_dir, model=model, device=device, formats=(fmt,),
                                            channels=files)
                expected = None
            else:
                path = self.exportVolume(node, work)
                command = msl.build_command(cmd, path, out_dir, model=model, device=device, formats=(fmt,))
                expected = msl.expected_output(path, out_dir, fmt)
            job = msl.MedsegJob(command, expected, log_dir=work, timeout=timeout, env=self.environment())
        except Exception:
            msl.cleanup_work_dir(work)
            raise
        return job, work

    def loadResult(self, path, node=None):
        """Load a .seg.nrrd (names and colours from the file) as a segmentation node."""
        seg = slicer.util.loadSegmentation(str(path))
        if node is not None:
            seg.SetName(slicer.mrmlScene.GenerateUniqueName(f"{node.GetName()} medseg"))
            seg.SetReferenceImageGeometryParameterFromVolumeNode(node)
        return seg

    def process(self, node, model=msl.DEFAULT_MODEL, device="auto", setting="", timeout=None, sequences=None):
        """Blocking run (for scripts and tests); returns (RunResult, segmentation node or None)."""
        job, work = self.start(node, model, device, setting, timeout, sequences=sequences)
        try:
            while not job.finished:
                for line in job.poll():
                    logging.info(line)
                slicer.app.processEvents()
                time.sleep(0.2)
            if job.result.success and job.result.output_path is None:
                job.result.output_path = msl.find_output(os.path.join(str(work), "output"))
                job.result.success = job.result.output_path is not None
            return job.result, (self.loadResult(job.result.output_path, node) if job.result.success else None)
        finally:
            msl.cleanup_work_dir(work)


class MedsegSegmentTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_MedsegSegment1()

    def test_MedsegSegment1(self):
        logic = MedsegSegmentLogic()
        try:
            logic.findExecutable(qt.QSettings().value(SETTING_EXECUTABLE, "") or "")
        except msl.MedsegNotFound as exc:
            self.delayDisplay(f"medseg not found, run skipped: {exc}")
            return
        import SampleData

        volume = SampleData.downloadSample("MRHead")
        self.delayDisplay("Running medseg on MRHead")
        result, seg = logic.process(volume, device="auto", timeout=1800)
        self.assertTrue(result.success, result.error)
        self.assertGreater(seg.GetSegmentation().GetNumberOfSegments(), 0)
        self.delayDisplay("Test passed")
