// TensorRT IPluginV3 wrapper of the fused GroupNorm(+SiLU) kernel ("UnidiffuserGroupNorm", "1", "").
//
// Inputs: x [N, C, H, W], gamma [C], beta [C]; output y like x. Fields: num_groups (int32),
// eps (float32), silu (int32 0/1). Formats: float32 kLINEAR / kHWC, float16 and bfloat16
// kLINEAR / kHWC8 (channel-last, C padded to a multiple of 8); gamma/beta share x's type, kLINEAR.
//
// Registration: the library exports getCreators()/setLoggerFinder(), the entry points that
// IPluginRegistry::loadLibrary() (Python: trt.get_plugin_registry().load_library(path)) and
// `trtexec --dynamicPlugins` look for. Build with -DUNIDIFFUSER_TRT_STATIC_REGISTRATION=ON to also
// register at dlopen time through REGISTER_TENSORRT_PLUGIN (that links libnvinfer; do not combine
// it with loadLibrary(), which would register the creator twice).
//
// Written against TensorRT 10's NvInferRuntime.h / NvInferPluginBase.h. Not compiled here: no
// TensorRT is installed on the build machines (see plugin/README.md).

#include "NvInferRuntime.h"
#include "unidiffuser_plugins.h"

#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace unidiffuser
{
namespace
{

constexpr char const* kName = "UnidiffuserGroupNorm";
constexpr char const* kVersion = "1";

// ---- logging through the logger TensorRT hands us (stderr until it does) ----------------------------

std::mutex gLogMutex;
ILoggerFinder* gLoggerFinder = nullptr;

void logError(char const* msg) noexcept
{
    ILogger* logger = nullptr;
    {
        std::lock_guard<std::mutex> lock(gLogMutex);
        try
        {
            if (gLoggerFinder)
                logger = gLoggerFinder->findLogger();
        }
        catch (...)
        {
            logger = nullptr;
        }
    }
    std::string text = std::string(kName) + ": " + msg;
    if (logger)
        logger->log(ILogger::Severity::kERROR, text.c_str());
    else
        std::fprintf(stderr, "%s\n", text.c_str());
}

int toDtype(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return UD_DTYPE_FLOAT32;
    case DataType::kHALF: return UD_DTYPE_FLOAT16;
    case DataType::kBF16: return UD_DTYPE_BFLOAT16;
    default: return -1;
    }
}

// Channel-last formats map to the kernel's NHWC path; kLINEAR to NCHW.
bool isChannelLast(TensorFormat f) { return f == TensorFormat::kHWC8 || f == TensorFormat::kHWC; }

// Elements between consecutive pixels: kHWC8 pads C up to a multiple of 8.
int pixelStride(TensorFormat f, int c) { return f == TensorFormat::kHWC8 ? (c + 7) / 8 * 8 : c; }

// Workspace for every shape up to maxDims: see unidiffuser_group_norm_workspace_size's plan.
// Tiles per sample shrink as the batch grows, so a smaller problem can need up to
// (1024 + n*g) more partials than the largest one; that slack is added here.
size_t workspaceBound(Dims const& d, int groups, int dtype, int layout)
{
    const size_t ws = unidiffuser_group_norm_workspace_size(
        int(d.d[0]), int(d.d[1]), int(d.d[2]), int(d.d[3]), groups, dtype, layout);
    if (ws == 0)
        return 0;
    return ws + (1024 + size_t(d.d[0]) * groups) * 2 * sizeof(float) + 256;
}

} // namespace

class GroupNormPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime
{
public:
    GroupNormPlugin(int32_t numGroups, float eps, int32_t silu)
        : mNumGroups(numGroups)
        , mEps(eps)
        , mSilu(silu)
    {
        initFields();
    }

    GroupNormPlugin(GroupNormPlugin const& other)
        : mNumGroups(other.mNumGroups)
        , mEps(other.mEps)
        , mSilu(other.mSilu)
    {
        initFields(); // the field collection points at this object's members, never the source's
    }

    ~GroupNormPlugin() override = default;

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    IPluginV3* clone() noexcept override
    {
        try
        {
            return new GroupNormPlugin(*this);
        }
        catch (...)
        {
            return nullptr;
        }
    }

    // IPluginV3OneCore
    AsciiChar const* getPluginName() const noexcept override { return kName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return ""; }

    // IPluginV3OneBuild
    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1)
            return fail("expected 3 inputs (x, gamma, beta) and 1 output");
        Dims const& x = in[0].desc.dims;
        if (x.nbDims != 4)
            return fail("x must be 4-D [N, C, H, W]");
        const int64_t c = x.d[1];
        if (c > 0 && c % mNumGroups != 0)
            return fail("channels not divisible by num_groups");
        for (int i = 1; i < 3; ++i)
        {
            int64_t vol = 1;
            bool known = true;
            for (int k = 0; k < in[i].desc.dims.nbDims; ++k)
            {
                known = known && in[i].desc.dims.d[k] >= 0;
                vol *= in[i].desc.dims.d[k];
            }
            if (known && c > 0 && vol != c)
                return fail("gamma and beta must hold C elements");
        }
        return 0;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbOutputs != 1 || nbInputs != 3)
            return 1;
        outputTypes[0] = inputTypes[0];
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1 || inputs[0].nbDims != 4)
            return 1;
        outputs[0] = inputs[0];
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1 || pos < 0 || pos > 3)
            return false;
        PluginTensorDesc const& d = inOut[pos].desc;
        if (pos == 0)
        {
            switch (d.type)
            {
            case DataType::kFLOAT: return d.format == TensorFormat::kLINEAR || d.format == TensorFormat::kHWC;
            case DataType::kHALF:
            case DataType::kBF16: return d.format == TensorFormat::kLINEAR || d.format == TensorFormat::kHWC8;
            default: return false;
            }
        }
        PluginTensorDesc const& x = inOut[0].desc;
        if (pos == 3) // y: same type and layout as x
            return d.type == x.type && d.format == x.format;
        return d.type == x.type && d.format == TensorFormat::kLINEAR; // gamma, beta
    }

    int32_t getNbOutputs() const noexcept override { return 1; }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override
    {
        PluginTensorDesc const& x = inputs[0].desc;
        const int layout = isChannelLast(x.format) ? UD_LAYOUT_NHWC : UD_LAYOUT_NCHW;
        return workspaceBound(inputs[0].max, mNumGroups, toDtype(x.type), layout);
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(
        PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1 || in[0].dims.nbDims != 4)
            return fail("expected x [N, C, H, W], gamma, beta and one output");
        if (in[0].dims.d[1] % mNumGroups != 0)
            return fail("channels not divisible by num_groups");
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        PluginTensorDesc const& x = inputDesc[0];
        const int n = int(x.dims.d[0]), c = int(x.dims.d[1]), h = int(x.dims.d[2]), w = int(x.dims.d[3]);
        const int dtype = toDtype(x.type);
        const int layout = isChannelLast(x.format) ? UD_LAYOUT_NHWC : UD_LAYOUT_NCHW;
        // TensorRT gave us workspaceBound(max dims), which covers this (smaller or equal) shape's
        // exact need; pass that need so the kernel's size check is meaningful.
        const size_t need = unidiffuser_group_norm_workspace_size(n, c, h, w, mNumGroups, dtype, layout);
        const int rc = unidiffuser_group_norm_strided(inputs[0], inputs[1], inputs[2], outputs[0], n, c, h, w,
            pixelStride(x.format, c), mNumGroups, mEps, mSilu, dtype, layout, workspace, need, stream);
        if (rc != 0)
            logError(unidiffuser_group_norm_error_string());
        return rc;
    }

    IPluginV3* attachToContext(IPluginResourceContext* context) noexcept override { return clone(); }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mFc; }

private:
    void initFields()
    {
        mFields.clear();
        mFields.emplace_back("num_groups", &mNumGroups, PluginFieldType::kINT32, 1);
        mFields.emplace_back("eps", &mEps, PluginFieldType::kFLOAT32, 1);
        mFields.emplace_back("silu", &mSilu, PluginFieldType::kINT32, 1);
        mFc.nbFields = int32_t(mFields.size());
        mFc.fields = mFields.data();
    }

    static int32_t fail(char const* msg) noexcept
    {
        logError(msg);
        return 1;
    }

    int32_t mNumGroups;
    float mEps;
    int32_t mSilu;
    std::vector<PluginField> mFields;
    PluginFieldCollection mFc{};
};

class GroupNormPluginCreator : public IPluginCreatorV3One
{
public:
    GroupNormPluginCreator()
    {
        mFields.emplace_back("num_groups", nullptr, PluginFieldType::kINT32, 1);
        mFields.emplace_back("eps", nullptr, PluginFieldType::kFLOAT32, 1);
        mFields.emplace_back("silu", nullptr, PluginFieldType::kINT32, 1);
        mFc.nbFields = int32_t(mFields.size());
        mFc.fields = mFields.data();
    }

    ~GroupNormPluginCreator() override = default;

    // Same fields in both phases: the runtime phase gets what getFieldsToSerialize() returned.
    IPluginV3* createPlugin(AsciiChar const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override
    {
        try
        {
            int32_t groups = 32, silu = 0;
            float eps = 1e-6f;
            bool haveGroups = false;
            for (int32_t i = 0; fc && i < fc->nbFields; ++i)
            {
                PluginField const& f = fc->fields[i];
                if (!f.name || !f.data || f.length < 1)
                    continue;
                if (!std::strcmp(f.name, "num_groups") && f.type == PluginFieldType::kINT32)
                {
                    groups = *static_cast<int32_t const*>(f.data);
                    haveGroups = true;
                }
                else if (!std::strcmp(f.name, "eps") && f.type == PluginFieldType::kFLOAT32)
                    eps = *static_cast<float const*>(f.data);
                else if (!std::strcmp(f.name, "silu") && f.type == PluginFieldType::kINT32)
                    silu = *static_cast<int32_t const*>(f.data) != 0;
                else
                {
                    logError((std::string("unexpected plugin field '") + f.name
                        + "' (expected num_groups:int32, eps:float32, silu:int32)").c_str());
                    return nullptr;
                }
            }
            if (!haveGroups || groups < 1 || !(eps >= 0.f))
            {
                logError("num_groups (int32 >= 1) is required; eps must be >= 0");
                return nullptr;
            }
            return new GroupNormPlugin(groups, eps, silu);
        }
        catch (...)
        {
            return nullptr;
        }
    }

    PluginFieldCollection const* getFieldNames() noexcept override { return &mFc; }
    AsciiChar const* getPluginName() const noexcept override { return kName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return ""; }

private:
    std::vector<PluginField> mFields;
    PluginFieldCollection mFc{};
};

} // namespace unidiffuser

#if defined(UNIDIFFUSER_TRT_STATIC_REGISTRATION)
using UnidiffuserGroupNormCreator = unidiffuser::GroupNormPluginCreator;
REGISTER_TENSORRT_PLUGIN(UnidiffuserGroupNormCreator);
#endif

extern "C" TENSORRTAPI IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static unidiffuser::GroupNormPluginCreator sGroupNormCreator;
    static IPluginCreatorInterface* const sCreators[] = {&sGroupNormCreator};
    nbCreators = 1;
    return sCreators;
}

extern "C" TENSORRTAPI void setLoggerFinder(ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(unidiffuser::gLogMutex);
    if (finder)
        unidiffuser::gLoggerFinder = finder;
}
