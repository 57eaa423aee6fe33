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
            "Segments the selected volume with the medseg command line (run in its own Python "
            "environment) and loads the result as a segmentation with named, coloured segments. "
            f"Point the module at medseg with the {msl.ENV_VAR} environment variable or the "
            "'medseg program' field under Advanced. See slicer/README.md in the medseg repository.")
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

        self.inputSelector = slicer.qMRMLNodeComboBox()
        self.inputSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.inputSelector.selectNodeUponCreation = True
        self.inputSelector.addEnabled = self.inputSelector.removeEnabled = self.inputSelector.noneEnabled = False
        self.inputSelector.setMRMLScene(slicer.mrmlScene)
        self.inputSelector.setToolTip("Volume to segment.")
        form.addRow("Input volume:", self.inputSelector)
        self.sequencesEdit = qt.QLineEdit("")
        self.sequencesEdit.setPlaceholderText("one volume: leave empty; several: e.g. flair, t1c")
        self.sequencesEdit.setToolTip("Models that take several MRI sequences (see 'medseg models', e.g. glioma: "
                                      "flair, t1c): their names in order. The input volume is the first; "
                                      "choose the others below. The result lies on the model's reference grid.")
        form.addRow("Sequences:", self.sequencesEdit)
        self.extraSelectors = []
        for i in range(2, 5):
            sel = slicer.qMRMLNodeComboBox()
            sel.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            sel.selectNodeUponCreation = False
            sel.addEnabled = sel.removeEnabled = False
            sel.noneEnabled = True
            sel.setMRMLScene(slicer.mrmlScene)
            sel.setToolTip(f"Volume of the {i}th sequence named above (co-registered with the input volume).")
            form.addRow(f"Sequence {i}:", sel)
            self.extraSelectors.append(sel)
        self.modelEdit = qt.QLineEdit(msl.DEFAULT_MODEL)
        self.modelEdit.setToolTip("Bundled model name (see 'medseg models') or path of a .pt model.")
        form.addRow("Model:", self.modelEdit)
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

    def cleanup(self):
        self.timer.stop()
        if self.job is not None and not self.job.finished:
            self.job.cancel()
            msl.cleanup_work_dir(self.run[0])

    def _setRunning(self, running):
        self.applyButton.enabled = not running
        self.cancelButton.enabled = running

    def onCheck(self):
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            cmd = self.logic.findExecutable(self.executableEdit.text)
            msl.check_medseg(cmd, timeout=60, env=self.logic.environment())
            formats = msl.predict_supports_format(cmd, timeout=60, env=self.logic.environment())
            self.statusLabel.text = f"medseg works: {' '.join(cmd)}" + ("" if formats else " (no --format: too old)")
        except msl.MedsegNotFound as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="medseg")
        finally:
            qt.QApplication.restoreOverrideCursor()

    def onApply(self):
        node = self.inputSelector.currentNode()
        if node is None:
            slicer.util.errorDisplay("Select an input volume first.")
            return
        qt.QSettings().setValue(SETTING_EXECUTABLE, self.executableEdit.text.strip())
        try:
            names = msl.parse_sequence_names(self.sequencesEdit.text)
            nodes = [node] + [sel.currentNode() for sel in self.extraSelectors][:max(0, len(names) - 1)]
            if names and (len(names) > 1 + len(self.extraSelectors) or any(n is None for n in nodes)):
                raise ValueError(f"choose one volume for each of the {len(names)} sequences: {', '.join(names)}")
            sequences = dict(zip(names, nodes)) if len(names) > 1 else None
            self.job, work = self.logic.start(node, self.modelEdit.text, self.deviceCombo.currentText,
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
